"""Speed measurement of an artifact with the runtime alone: TTFT, prefill and decode tokens/s at batch 1.

For each prompt length the cache is reset, a prompt of random token ids (fixed seed) is prefilled
(time to first token = prefill + first sample), then `gen_tokens` tokens are decoded (greedily unless
`sampling` says otherwise; seeded) with EOS ignored, so every run does the same work. Every token reaches
the host, as in real generation (its logits, or from overlapped steps the token itself), and the last
one is waited for: wall-clock timing is exact.

The Orin figure is a PROJECTION, not a measurement: the bandwidth efficiency measured here (weight
bytes read per token / decode time, over this machine's device copy bandwidth) times the Jetson AGX
Orin's 204.8 GB/s peak DRAM bandwidth.
"""
from __future__ import annotations

import dataclasses
import platform
import resource
import time
from typing import Any

import numpy as np

from runtime.engine import Engine
from runtime.tvm_loader import cuda_memory_used
from runtime.sampling import SamplingParams

ORIN_BANDWIDTH_GBS = 204.8
# published batch-1 decode figures for Llama-2-7B on Jetson AGX Orin (see shared/docs/REFERENCE.md)
ORIN_PUBLISHED_7B = {"TinyChat (W4)": 39.0, "MLC-LLM (W4)": 47.0, "llama.cpp (Q4)": 22.0}


def weight_bytes_per_token(engine: Engine) -> int:
    """Bytes of parameters one decode step reads: all of them, except an untied embedding table (one row)."""
    m = engine.manifest
    tied = bool(m.model.get("tie_word_embeddings", False))
    total = 0
    for p in m.params:
        n = int(np.prod(p["shape"])) * np.dtype(p["dtype"]).itemsize
        if not tied and "embed" in p["name"]:
            continue
        total += n
    return total


def device_copy_bandwidth(engine: Engine, nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written), with the TVM runtime."""
    copy = engine.ffi.get_global_func("runtime.TVMTensorCopyFromTo")
    n = nbytes // 2
    a, b = engine.empty((n,), "float16"), engine.empty((n,), "float16")
    copy(a, b)
    engine.sync()
    t = time.perf_counter()
    for _ in range(reps):
        copy(a, b)
    engine.sync()
    dt = (time.perf_counter() - t) / reps
    del a, b
    return 2 * n * 2 / dt


def _random_prompt(engine: Engine, n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    avoid = engine.eos_token_ids
    ids = rng.integers(100, engine.vocab, size=n).tolist()
    return [i if i not in avoid else 100 for i in ids]


def bench_one(engine: Engine, prompt_len: int, gen_tokens: int, seed: int = 0,
              sampling: SamplingParams | None = None) -> dict[str, Any]:
    engine.reset()
    ids = _random_prompt(engine, prompt_len, seed)
    stats: dict[str, Any] = {}
    sampling = sampling or SamplingParams()
    if not sampling.greedy and sampling.seed is None:  # the same draws in every run
        sampling = dataclasses.replace(sampling, seed=seed)
    tokens = list(engine.generate_ids(ids, gen_tokens, sampling, stop_token_ids=set(), stats=stats))
    steps = stats["decode_steps"]
    return {
        "prompt_tokens": prompt_len,
        "generated_tokens": len(tokens),
        "ttft_ms": stats["ttft_s"] * 1e3,
        "prefill_tokens_per_s": prompt_len / stats["prefill_s"],
        "decode_tokens_per_s": steps / stats["decode_s"] if steps else float("nan"),
        "decode_ms_per_token": stats["decode_s"] / steps * 1e3 if steps else float("nan"),
    }


def run_bench(engine: Engine, prompt_lengths=(128, 512, 2048), gen_tokens: int = 256,
              measure_copy_bandwidth: bool = True, label: str = "",
              sampling: SamplingParams | None = None) -> dict[str, Any]:
    # warm-up: first calls load kernels and fill the pooled allocator
    bench_one(engine, min(16, engine.context_length - 9), 8, sampling=sampling)
    rows, skipped = [], []
    for n in prompt_lengths:
        if n + gen_tokens > engine.context_length:
            skipped.append({"prompt_tokens": n, "why": f"{n}+{gen_tokens} exceeds the context {engine.context_length}"})
            continue
        rows.append(bench_one(engine, n, gen_tokens, sampling=sampling))
    out: dict[str, Any] = {
        "label": label or str(engine.folder),
        "artifact": str(engine.folder),
        "target": engine.manifest.target.get("name"),
        "quantization": engine.manifest.quantization,
        "device": engine.device_name,
        "cuda_graph": engine.manifest.cuda_graph,
        "decode_step_graph": dict(engine.graph.counts) if engine.graph is not None else None,
        # greedy steps overlapped (runtime/cuda_graph.py): compare tokens/s only between runs that agree here
        "overlapped_greedy": engine.overlap,
        # sampled decoding (and greedy with a repetition penalty) on the device, overlapped: artifacts with `sample`
        "overlapped_sampling": engine.overlap_sampling,
        "sampling": dataclasses.asdict(sampling or SamplingParams()),
        "results": rows,
        "skipped": skipped,
        "weight_bytes_per_token": weight_bytes_per_token(engine),
    }
    if engine.device_name == "cuda":
        used, before = cuda_memory_used(), engine.memory_before_load
        out["device_memory_bytes"] = used - before if used is not None and before is not None else None
        out["device_memory_note"] = ("GPU memory in use after the runs minus before the engine loaded its weights "
                                     "(TVM's pooled allocator keeps its high-water mark, so this is the peak: "
                                     "weights + KV cache + workspace)")
        if measure_copy_bandwidth:
            out["copy_bandwidth_Bps"] = device_copy_bandwidth(engine)
    else:
        out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out["host"] = platform.processor() or platform.machine()
    if rows:
        dec = np.median([r["decode_tokens_per_s"] for r in rows])
        out["decode_weight_bandwidth_Bps"] = float(dec * out["weight_bytes_per_token"])
        if out.get("copy_bandwidth_Bps"):
            eff = out["decode_weight_bandwidth_Bps"] / out["copy_bandwidth_Bps"]
            out["bandwidth_efficiency"] = eff
            out["orin_projection"] = {
                "label": "PROJECTION (not measured): bandwidth efficiency here x 204.8 GB/s Orin DRAM",
                "decode_tokens_per_s": eff * ORIN_BANDWIDTH_GBS * 1e9 / out["weight_bytes_per_token"],
                "published_llama2_7b_orin": ORIN_PUBLISHED_7B,
            }
    return out


def ratios(run: dict[str, Any], base: dict[str, Any]) -> list[dict[str, Any]]:
    """Per prompt length: this run's figure over the baseline's (decode and prefill speedup, TTFT ratio)."""
    by_len = {r["prompt_tokens"]: r for r in base.get("results", [])}
    out = []
    for r in run.get("results", []):
        b = by_len.get(r["prompt_tokens"])
        if b is None:
            continue
        out.append({
            "prompt_tokens": r["prompt_tokens"],
            "decode_speedup": r["decode_tokens_per_s"] / b["decode_tokens_per_s"],
            "prefill_speedup": r["prefill_tokens_per_s"] / b["prefill_tokens_per_s"],
            "ttft_ratio": r["ttft_ms"] / b["ttft_ms"],
        })
    return out


def format_table(runs: list[dict[str, Any]]) -> str:
    lines = [f"{'run':<34} {'prompt':>6} {'TTFT ms':>9} {'prefill tok/s':>14} {'decode tok/s':>13}"]
    for run in runs:
        for r in run.get("results", []):
            ttft = r.get("ttft_ms", float("nan"))
            pre = r.get("prefill_tokens_per_s", float("nan"))
            lines.append(f"{run['label'][:34]:<34} {r['prompt_tokens']:>6} {ttft:>9.1f} {pre:>14.0f} "
                         f"{r['decode_tokens_per_s']:>13.1f}")
        if run.get("orin_projection"):
            p = run["orin_projection"]
            lines.append(f"  {run['label'][:32]}: bandwidth efficiency {run['bandwidth_efficiency']:.2f}; "
                         f"Jetson AGX Orin PROJECTION {p['decode_tokens_per_s']:.1f} tok/s "
                         f"(published Llama-2-7B on Orin: " +
                         ", ".join(f"{k} {v:g}" for k, v in p["published_llama2_7b_orin"].items()) + ")")
    return "\n".join(lines)
