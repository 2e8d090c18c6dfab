"""The device sampler alone (tvm_kernels/sample.py through an artifact's `sample`): 1000 calls queued back to
back on one row of random logits, best of 3, per setting. The GPU is the bound (a call's host side is
~10 us), so the figure is the kernel's time plus a little; compare artifacts within one run.

  PYTHONPATH=/tmp/tvmrt AWQ_EDGE_TVM_LIB=$PWD/.gpu/tvmrt python3 benchmarks/_device_sample_time.py \\
      --out $OUT/sample_time.json smollm2-awq [OTHER ...]      (folders under .gpu/h5)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# [temperature, top_p, top_k, repetition penalty]
SETTINGS = {"T0.7": [0.7, 1.0, 0, 1.0], "T0.7 top_k 50": [0.7, 1.0, 50, 1.0], "T0.7 top_p 0.9": [0.7, 0.9, 0, 1.0],
            "T0.7 top_k 40 top_p 0.95": [0.7, 0.95, 40, 1.0], "T0.7 top_k 40 top_p 0.95 rep 1.3": [0.7, 0.95, 40, 1.3],
            "greedy rep 1.3": [0.0, 1.0, 0, 1.3], "T0.7 top_k 2000": [0.7, 1.0, 2000, 1.0]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--out", default="/tmp/out/sample_time.json")
    args = ap.parse_args()
    import torch  # noqa: F401  (libcudart.so.13 from torch's wheels, before the TVM runtime)

    from benchmarks.e2e import _device_info, _engine_ab, header

    res = {}
    for art in args.artifacts:
        eng = _engine_ab(art)
        V = eng.vocab
        seen_arg = len(eng.manifest.functions["sample"]["inputs"]) == 4  # exports before 5e0401d take no `seen`
        x = eng.to_device((np.random.default_rng(0).standard_normal(V) * 3).astype(np.float32).reshape(1, 1, V))
        r, sd = eng.to_device(np.array([1, 0], np.int32)), eng.to_device(np.zeros(V, np.int32))
        for name, cfg in SETTINGS.items():
            if not seen_arg and (cfg[3] != 1.0 or cfg[0] == 0):
                continue
            c = eng.to_device(np.array(cfg if seen_arg else cfg[:3] + [0], np.float32))
            args_ = (x, c, r, sd) if seen_arg else (x, c, r)
            for _ in range(50):
                eng.fn["sample"](*args_)
            eng.sync()
            best = []
            for _ in range(3):
                t = time.perf_counter()
                for _ in range(1000):
                    eng.fn["sample"](*args_)
                eng.sync()
                best.append((time.perf_counter() - t) / 1000 * 1e6)
            res.setdefault(art, {})[name] = min(best)
            print(f"{art:16s} {name:36s} {min(best):7.1f} us a call", flush=True)
        del eng
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(header({"device": _device_info(), "us_per_call_best_of_3": res}), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
