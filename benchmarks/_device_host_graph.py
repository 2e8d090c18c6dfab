"""Where the host time of a decode step goes with the step graph (GPU machine): `Engine.decode()` against
the graph replayed alone, and decode() split into its calls, each timed on the host.

  PYTHONPATH=/tmp/tvmrt AWQ_EDGE_TVM_LIB=$PWD/.gpu/tvmrt python3 benchmarks/_device_host_graph.py \
      --out $OUT/host_graph.json ART...
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
STEPS = 200


def per_call(engine) -> dict[str, float]:
    """decode()'s pieces (µs a step, averaged), in the order _graph_step runs them."""
    from runtime.engine import SEQ_ID

    t = dict.fromkeys(("check", "stream_in", "begin", "qpos", "step", "copy", "end", "stream_out", "extend", "total"), 0.0)
    for _ in range(STEPS):
        m = [time.perf_counter()]
        engine._check_room(1)
        m.append(time.perf_counter())
        cm = engine._on_stream()
        cm.__enter__()
        m.append(time.perf_counter())
        engine._kv_begin(engine.kv, engine.ffi.Shape([SEQ_ID]), engine.ffi.Shape([1]))
        m.append(time.perf_counter())
        engine._qpos(engine.kv)
        m.append(time.perf_counter())
        logits = engine.graph.step(5, len(engine.cached) + 1)
        m.append(time.perf_counter())
        logits.copy()
        m.append(time.perf_counter())
        engine._kv_end(engine.kv)
        m.append(time.perf_counter())
        cm.__exit__(None, None, None)
        m.append(time.perf_counter())
        engine.cached.append(5)
        m.append(time.perf_counter())
        for k, a, b in zip(list(t)[:-1], m, m[1:]):
            t[k] += (b - a) / STEPS * 1e6
        t["total"] += (m[-1] - m[0]) / STEPS * 1e6
    return t


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import torch  # libcudart.so.13 from torch's wheels, before the TVM runtime

    from runtime.engine import Engine

    res: dict = {"device": torch.cuda.get_device_name(), "command": " ".join(sys.argv), "runs": {}}
    for art in args.artifacts:
        eng = Engine(art, device="cuda", verify=False, synthesize_weights=True)
        if eng.graph is None:
            raise SystemExit(f"{art}: no decode-step graph (export with --cuda-graph step)")
        eng.prefill(np.random.default_rng(0).integers(100, 1000, 512).tolist())
        for _ in range(8):
            eng.decode(5)
        t0 = time.perf_counter()
        for _ in range(STEPS):
            eng.decode(5)
        decode_us = (time.perf_counter() - t0) / STEPS * 1e6
        g = eng.graph
        exec_ = next(reversed(g.graphs.values()))[0]  # the graph of the current page count
        t0 = time.perf_counter()
        for _ in range(STEPS):
            g.cuda("cudaGraphLaunch", exec_, g.stream)
            g.cuda("cudaStreamSynchronize", g.stream)
        replay_us = (time.perf_counter() - t0) / STEPS * 1e6
        run = {"decode_call_us": decode_us, "replay_and_sync_us": replay_us, "decode_call_parts_us": per_call(eng)}
        res["runs"][art] = run
        print(art, round(decode_us, 1), round(replay_us, 1), {k: round(v, 1) for k, v in run["decode_call_parts_us"].items()},
              flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
