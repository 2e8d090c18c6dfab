"""Side by side on the GPU machine: `Engine.generate_ids` (greedy, `runtime.bench.bench_one`) sampling the step
graph's pinned logits in place, against the same loop reading them as the runtime did before (a copy out of
`decode()`, a second one in the sampler), same engine, alternating rounds. Only host time differs.

  PYTHONPATH=/tmp/tvmrt AWQ_EDGE_TVM_LIB=$PWD/.gpu/tvmrt python3 benchmarks/_device_logits_copy.py \
      --out $OUT/logits_copy.json ART...
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class copying:
    """The runtime as it read the logits before: decode() hands generate a copy and the sampler copies again."""

    def __init__(self, engine):
        self.engine = engine

    def __enter__(self):
        import runtime.sampling as sampling

        self.penalty = sampling.repetition_penalty
        sampling.repetition_penalty = lambda x, prev, p: self.penalty(np.array(x, dtype=np.float32, copy=True), prev, p)
        view = type(self.engine)._decode_view.__get__(self.engine)
        self.engine._decode_view = lambda token: view(token).copy()  # an instance attribute, as decode() copies

    def __exit__(self, *exc):
        import runtime.sampling as sampling

        sampling.repetition_penalty = self.penalty
        del self.engine._decode_view


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompt-lengths", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    import torch  # noqa: F401  (libcudart.so.13 from torch's wheels, before the TVM runtime)

    from runtime.bench import bench_one
    from runtime.engine import Engine

    res: dict = {"device": torch.cuda.get_device_name(), "command": " ".join(sys.argv), "runs": {}}
    for art in args.artifacts:
        eng = Engine(art, device="cuda", verify=False, synthesize_weights=True)
        bench_one(eng, 16, 8)
        rows = []
        for r in range(args.rounds):
            for L in args.prompt_lengths:
                new = bench_one(eng, L, 256)["decode_tokens_per_s"]
                with copying(eng):
                    old = bench_one(eng, L, 256)["decode_tokens_per_s"]
                rows.append({"round": r, "prompt_tokens": L, "in_place": new, "copying": old})
        med = {L: {k: statistics.median(x[k] for x in rows if x["prompt_tokens"] == L) for k in ("in_place", "copying")}
               for L in args.prompt_lengths}
        res["runs"][art] = {"rounds": rows, "median_tokens_per_s": med,
                            "ratio": {L: m["in_place"] / m["copying"] for L, m in med.items()}}
        print(art, {L: round(v, 3) for L, v in res["runs"][art]["ratio"].items()}, med, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
