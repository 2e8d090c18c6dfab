"""Where a decode step's GPU time goes: per-kernel times of exported artifacts (GPU machine).

Runs on the GPU machine with the runtime bundle (no TVM compiler): torch's profiler (CUPTI) records
every kernel the TVM runtime launches in this process, graph-replayed ones included. For each artifact:
prefill a prompt (profiled once), warm up decode, then profile `--steps` decode steps and report per
kernel name the time per step; also the step's wall time without the profiler, so the gap between the
kernel time and the wall time (launches, host work, idle GPU) shows.

  PYTHONPATH=/tmp/tvmrt AWQ_EDGE_TVM_LIB=$PWD/.gpu/tvmrt python3 benchmarks/_device_profile.py \
      --out $OUT/profile.json .gpu/h5/llama7b-w4 .gpu/h5/smollm2-awq
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def kernel_table(prof, steps: int) -> list[dict]:
    agg: dict[str, list[float]] = defaultdict(list)
    for ev in prof.events():
        if ev.device_type.name == "CUDA" and ev.name and not ev.name.startswith("Memcpy"):
            agg[ev.name].append(ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total)
    rows = [{"kernel": k, "us_per_step": sum(v) / steps, "calls_per_step": len(v) / steps} for k, v in agg.items()]
    return sorted(rows, key=lambda r: -r["us_per_step"])


def profile(artifact: str, prompt: int, steps: int) -> dict:
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile as tprofile

    from runtime.engine import Engine

    eng = Engine(artifact, device="cuda", verify=False, synthesize_weights=True)
    ids = np.random.default_rng(0).integers(100, 1000, size=prompt).tolist()
    eng.prefill(ids)
    eng.reset()
    with tprofile(activities=[ProfilerActivity.CUDA]) as p:
        eng.prefill(ids)
    prefill_rows = kernel_table(p, 1)
    tok = 5
    for _ in range(16):
        eng.decode(tok)
    eng.sync()
    t = time.perf_counter()
    for _ in range(steps):
        eng.decode(tok)
    eng.sync()
    wall = (time.perf_counter() - t) / steps * 1e6
    with tprofile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(steps):
            eng.decode(tok)
        eng.sync()
    rows = kernel_table(p, steps)
    res = {"artifact": artifact, "prompt_tokens": prompt, "decode_steps": steps, "decode_wall_us_per_step": wall,
           "decode_kernel_us_per_step": sum(r["us_per_step"] for r in rows),
           "decode_kernel_launches_per_step": sum(r["calls_per_step"] for r in rows),
           "decode": rows, "prefill_kernel_us": sum(r["us_per_step"] for r in prefill_rows), "prefill": prefill_rows}
    print(f"\n== {artifact}: decode wall {wall:.1f} us/step, kernels {res['decode_kernel_us_per_step']:.1f} us "
          f"in {res['decode_kernel_launches_per_step']:.0f} launches; prefill {prompt} tokens kernels "
          f"{res['prefill_kernel_us'] / 1e3:.2f} ms", flush=True)
    for r in rows[:25]:
        print(f"  {r['us_per_step']:9.1f} us {r['calls_per_step']:6.1f}x  {r['kernel'][:110]}")
    print("  prefill:")
    for r in prefill_rows[:15]:
        print(f"  {r['us_per_step']:9.1f} us {r['calls_per_step']:6.1f}x  {r['kernel'][:110]}")
    del eng
    torch.cuda.synchronize()
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    import torch  # noqa: F401  (libcudart.so.13 from torch's wheels, before the TVM runtime)

    out = [profile(x, a.prompt, a.steps) for x in a.artifacts]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "command": " ".join(sys.argv),
                                       "runs": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
