"""Where the time between two overlapped greedy decode steps goes (runtime/cuda_graph.py), on the GPU machine:

  PYTHONPATH=/tmp/tvmrt AWQ_EDGE_TVM_LIB=$PWD/.gpu/tvmrt python3 benchmarks/_device_overlap_gap.py OUT.json NAME...

For each artifact under .gpu/h5 (random weights): the time per token of a 256-token greedy generation at a
512-token prompt, the greedy step graph replayed back to back (GPU time with no host in between), and the
median host time of each call of the loop (the KV cache's begin_forward / end_forward, the wait for the step
before, the page-table copy call, the graph launch). The last two are host time between two steps; on a fast
host they are not what the GPU waits for (benchmarks/results/attention_mark_ab_h100.json).
"""
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402,F401  (loads libcudart.so.13 from torch's wheels before the TVM runtime)

from benchmarks.e2e import _device_info, _engine_ab, header  # noqa: E402
from runtime.bench import _random_prompt  # noqa: E402

res = {}
for name in sys.argv[2:]:
    eng = _engine_ab(name)
    g = eng.graph
    prompt = _random_prompt(eng, 512, 1)
    list(eng.generate_ids(prompt, 64, stop_token_ids=set()))  # warm: greedy graphs captured
    # per-piece host timing inside the overlapped loop
    T = {"begin": [], "wait": [], "qpos": [], "launch": [], "end": []}
    kb, qp, ke = eng._kv_begin, eng._qpos, eng._kv_end

    def tm(key, f):
        def w(*a):
            t = time.perf_counter()
            r = f(*a)
            T[key].append(time.perf_counter() - t)
            return r
        return w

    eng._kv_begin, eng._qpos, eng._kv_end = tm("begin", kb), tm("qpos", qp), tm("end", ke)
    gw, gl = g.wait, g.launch_token
    g.wait, g.launch_token = tm("wait", gw), tm("launch", gl)
    st = {}
    list(eng.generate_ids(prompt, 256, stop_token_ids=set(), stats=st))
    per_tok = st["decode_s"] / (st["decode_steps"])
    eng._kv_begin, eng._qpos, eng._kv_end = kb, qp, ke
    g.wait, g.launch_token = gw, gl
    # the step's last graph (greedy, or with the logits copy for NAME:sync) replayed back to back: GPU time of a
    # step with no host in between
    key = next(k for k in reversed(g.graphs) if k[0] == int(eng.overlap))
    ex = g.graphs[key][0]
    g.cuda("cudaStreamSynchronize", g.stream)
    t = time.perf_counter()
    for _ in range(300):
        g.cuda("cudaGraphLaunch", ex, g.stream)
    g.cuda("cudaStreamSynchronize", g.stream)
    replay = (time.perf_counter() - t) / 300
    r = {"overlap": eng.overlap, "graph_keys": [list(k) for k in g.graphs],
         "per_token_us": per_tok * 1e6, "step_graph_back_to_back_us": replay * 1e6,
         **{k + "_us": float(np.median(v) * 1e6) for k, v in T.items() if v}}
    print(name, json.dumps(r), flush=True)
    res[name] = r
    del eng
Path(sys.argv[1]).write_text(json.dumps(header({"device": _device_info(), "artifacts": res}), indent=2))
