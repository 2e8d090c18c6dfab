"""Two exports of the same model shape, same synthesized weights (seed 0): do they compute the same thing?

Used on the GPU machine to check a kernel change end to end before timing it: prefill a prompt, then
greedy-decode with artifact A and feed A's tokens to B as well; report the largest logit difference
(relative to the largest |logit|) and whether the greedy tokens agree.

  PYTHONPATH=/tmp/tvmrt AWQ_EDGE_TVM_LIB=$PWD/.gpu/tvmrt python3 benchmarks/_device_compare.py \
      NEW_ARTIFACT OLD_ARTIFACT [--prompt 512 --steps 32]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--out")
    args = ap.parse_args()
    import numpy as np
    import torch  # noqa: F401  (libcudart.so.13 from torch's wheels, before the TVM runtime)

    from runtime.engine import Engine

    ids = np.random.default_rng(1).integers(100, 1000, size=args.prompt).tolist()
    ea = Engine(args.a, device="cuda", verify=False, synthesize_weights=True, seed=0)
    eb = Engine(args.b, device="cuda", verify=False, synthesize_weights=True, seed=0)
    la, lb = ea.prefill(ids), eb.prefill(ids)
    worst, same = 0.0, 0
    for _ in range(args.steps):
        worst = max(worst, float(np.abs(la - lb).max() / np.abs(lb).max()))
        ta, tb = int(la.argmax()), int(lb.argmax())
        same += ta == tb
        la, lb = ea.decode(ta), eb.decode(ta)
    res = {"a": args.a, "b": args.b, "prompt": args.prompt, "steps": args.steps,
           "max_rel_logit_diff": worst, "greedy_agree": same}
    print(json.dumps(res), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
