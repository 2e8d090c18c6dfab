"""`awq-edge bench ARTIFACT [--baseline FP16_ARTIFACT] [--hf MODEL] [--gguf FILE]`.

The artifact and its baselines run through the runtime (runtime/bench.py); `--hf` adds Hugging Face
transformers eager `generate` (the reference AWQ's papers quote speedups against: FP16 on a GPU,
FP32 on a CPU where FP16 matmuls are emulated), `--gguf` adds llama.cpp (llama-cpp-python) on a GGUF
file. All runs use the same prompt lengths, the same random prompt ids and greedy decoding of the
same number of tokens, in one process, so the ratios compare like with like.
"""
from __future__ import annotations

import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def random_prompt(vocab: int, n: int, seed: int = 0, avoid=()) -> list[int]:
    # same draw as runtime.bench._random_prompt
    rng = np.random.default_rng(seed)
    ids = rng.integers(100, vocab, size=n).tolist()
    return [i if i not in set(avoid) else 100 for i in ids]


def hf_bench(model: str | Path, prompt_lengths, gen_tokens: int, device: str = "auto",
             dtype: str = "auto", label: str | None = None) -> dict[str, Any]:
    """transformers eager generate, greedy, EOS ignored (min_new_tokens), batch 1."""
    import torch
    from transformers import AutoModelForCausalLM

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "float16" if device == "cuda" else "float32"
    torch_dtype = getattr(torch, dtype)
    if isinstance(model, (str, Path)):
        m = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch_dtype, attn_implementation="eager").to(device)
        name = str(model)
    else:  # an already built model (e.g. random 7B-shape weights made on the device)
        m, name = model.to(device=device, dtype=torch_dtype), label or type(model).__name__
    m.eval()
    vocab = m.config.vocab_size
    eos = m.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    ctx = getattr(m.config, "max_position_embeddings", 1 << 30)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def gen(ids, n):
        x = torch.tensor([ids], device=device)
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=eos[0] if eos else 0)
        sync()
        return time.perf_counter() - t

    gen(random_prompt(vocab, 16, 1, eos), 4)  # warm-up
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rows, skipped = [], []
    for n in prompt_lengths:
        if n + gen_tokens > ctx:
            skipped.append({"prompt_tokens": n, "why": f"exceeds max_position_embeddings {ctx}"})
            continue
        ids = random_prompt(vocab, n, 0, eos)
        ttft = gen(ids, 1)
        total = gen(ids, gen_tokens)
        rows.append({"prompt_tokens": n, "generated_tokens": gen_tokens, "ttft_ms": ttft * 1e3,
                     "prefill_tokens_per_s": n / ttft,
                     "decode_tokens_per_s": (gen_tokens - 1) / (total - ttft),
                     "decode_ms_per_token": (total - ttft) / (gen_tokens - 1) * 1e3})
    out = {"label": f"hf-eager-{dtype}:{Path(name).name}", "model": name, "device": device, "dtype": dtype,
           "results": rows, "skipped": skipped,
           "note": "transformers eager generate; TTFT = generate(max_new_tokens=1); decode = (total - TTFT) / (n - 1)"}
    if device == "cuda":
        out["device_memory_bytes"] = torch.cuda.max_memory_allocated()
    return out


def llamacpp_bench(gguf: Path, prompt_lengths, gen_tokens: int, n_ctx: int = 4096, threads: int | None = None) -> dict[str, Any]:
    """llama.cpp through llama-cpp-python: prompt eval then greedy token-by-token generation."""
    try:
        from llama_cpp import Llama
    except ImportError as e:
        return {"label": "llama.cpp", "error": f"llama-cpp-python not installed ({e})", "results": []}
    llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_batch=512, verbose=False, logits_all=False)
    vocab = llm.n_vocab()
    eos = [llm.token_eos()]

    def run(ids, n):
        llm.reset()
        t0 = time.perf_counter()
        ttft = None
        count = 0
        for _tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            count += 1
            if ttft is None:
                ttft = time.perf_counter() - t0
            if count >= n:
                break
        return ttft, time.perf_counter() - t0

    run(random_prompt(vocab, 16, 1, eos), 4)
    rows = []
    for n in prompt_lengths:
        if n + gen_tokens > n_ctx:
            continue
        ttft, total = run(random_prompt(vocab, n, 0, eos), gen_tokens)
        rows.append({"prompt_tokens": n, "generated_tokens": gen_tokens, "ttft_ms": ttft * 1e3,
                     "prefill_tokens_per_s": n / ttft, "decode_tokens_per_s": (gen_tokens - 1) / (total - ttft),
                     "decode_ms_per_token": (total - ttft) / (gen_tokens - 1) * 1e3})
    import llama_cpp

    return {"label": f"llama.cpp:{Path(gguf).name}", "model": str(gguf), "device": "cpu",
            "llama_cpp_python": llama_cpp.__version__, "threads": llm.n_threads if hasattr(llm, "n_threads") else threads,
            "results": rows}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent.parent).stdout.strip()
    except OSError:
        return ""


def cmd_bench(args) -> int:
    from awq_edge.errors import UserError
    from runtime.cli import bench_artifacts, report_bench

    if args.temperature > 0 and (args.hf or args.gguf):
        raise UserError("--hf / --gguf baselines decode greedily: bench with --temperature 0 to compare against them")
    runs = bench_artifacts(args)
    if args.hf:
        runs.append(hf_bench(args.hf, args.prompt_lengths, args.gen_tokens, args.hf_device, args.hf_dtype))
    if args.gguf:
        runs.append(llamacpp_bench(args.gguf, args.prompt_lengths, args.gen_tokens))
    report_bench(runs, args, extra={"command": " ".join(sys.argv), "git_commit": git_commit(),
                                    "host": platform.node(), "machine": platform.machine()})
    return 0


def register(sub) -> None:
    from runtime.cli import add_bench_args, add_engine_args

    p = sub.add_parser("bench", help="TTFT, prefill and decode tokens/s vs FP16 baseline / HF transformers / llama.cpp")
    add_engine_args(p)
    add_bench_args(p)
    p.add_argument("--hf", help="HF model folder: also time transformers eager generate on it")
    p.add_argument("--hf-device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--hf-dtype", default="auto", help="float16 on CUDA, float32 on CPU by default")
    p.add_argument("--gguf", type=Path, help="GGUF file: also time llama.cpp (llama-cpp-python) on it")
    p.set_defaults(func=cmd_bench)
