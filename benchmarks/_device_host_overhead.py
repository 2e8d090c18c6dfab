"""Where the host time of one decode step goes (GPU machine): the runtime's decode() split into its
calls, each timed on the host, against the step's GPU kernel time from _device_profile.py.

  PYTHONPATH=/tmp/tvmrt AWQ_EDGE_TVM_LIB=$PWD/.gpu/tvmrt python3 benchmarks/_device_host_overhead.py \
      --out $OUT/host_overhead.json ART...
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import torch  # libcudart.so.13 from torch's wheels, before the TVM runtime

    from runtime.engine import SEQ_ID, Engine

    out = []
    for art in args.artifacts:
        # the plain VM path, piece by piece (a decode-step graph would replace all of it by one launch:
        # e2e.py device-graph times that)
        eng = Engine(art, device="cuda", verify=False, synthesize_weights=True, cuda_graph=False)
        eng.prefill(np.random.default_rng(0).integers(100, 1000, 128).tolist())
        for _ in range(16):
            eng.decode(5)
        eng.sync()
        t = {k: 0.0 for k in ("begin", "embed", "decode_enqueue", "end", "sync", "to_host", "total")}
        n = 64
        ids = np.asarray([5], dtype=np.int32)
        for _ in range(n):
            t0 = time.perf_counter()
            eng._kv_begin(eng.kv, eng.ffi.Shape([SEQ_ID]), eng.ffi.Shape([1]))
            t1 = time.perf_counter()
            e = eng._embed(ids, eng._token_buf)
            t2 = time.perf_counter()
            logits = eng.fn["decode"](e, eng.kv, eng.params)
            t3 = time.perf_counter()
            eng._kv_end(eng.kv)
            t4 = time.perf_counter()
            eng.sync()
            t5 = time.perf_counter()
            eng.to_host(logits, eng._logits_host.reshape(1, 1, -1))
            t6 = time.perf_counter()
            eng.cached.append(5)
            for k, a, b in (("begin", t0, t1), ("embed", t1, t2), ("decode_enqueue", t2, t3), ("end", t3, t4),
                            ("sync", t4, t5), ("to_host", t5, t6), ("total", t0, t6)):
                t[k] += (b - a) / n * 1e6
        row = {"artifact": art, "us_per_step": t}
        print(json.dumps(row), flush=True)
        out.append(row)
        del eng
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "device": torch.cuda.get_device_name(), "command": " ".join(sys.argv),
        "note": "host time of each call of one decode step (prompt 128, synthesized weights), 64 steps averaged; "
                "decode_enqueue = the VM decode call returning, sync = waiting for the GPU afterwards",
        "rows": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
