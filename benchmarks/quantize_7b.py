"""AWQ quantization speed and memory: a synthetic Llama-2-7B-shaped model on the GPU, SmolLM2 on CPU.

    # the issue's benchmark (GPU machine; goal < 5 min end to end, < 8 GiB peak GPU memory)
    PYTHONPATH=. python benchmarks/quantize_7b.py --device cuda
    # CPU time for the shared SmolLM2 model (g64, calibration from the shared calib file)
    python benchmarks/quantize_7b.py --model smollm2 --device cpu --group-size 64 --samples 16
    # quick check of the script itself with a tiny shape
    python benchmarks/quantize_7b.py --device cpu --layers 2 --hidden 256 --intermediate 512 --heads 4 \
        --vocab 1000 --samples 4 --seqlen 64 --group-size 64 --out /tmp/q.json

The synthetic model has random fp16 weights (std 0.02; speed does not depend on the values) and
random calibration tokens; it is built on the meta device and filled tensor by tensor, so building
takes seconds, not the minutes of a normal random init. Prints and writes a JSON record with the
device, git commit and exact command. Total time = capture of layer-0 inputs + all layers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from awq_edge.adapters import get_adapter  # noqa: E402
from awq_edge.quantizer import QuantConfig, quantize_model  # noqa: E402


def git_commit() -> str:
    if os.environ.get("AWQ_EDGE_GIT_COMMIT"):
        return os.environ["AWQ_EDGE_GIT_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
        return sha.strip() + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cpus, {torch.get_num_threads()} threads)"


@torch.no_grad()
def synthetic_llama(args, fill_device: str):
    """Llama-2-7B-shaped model (by default) with random fp16 weights, parameters on CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, vocab_size=args.vocab, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    config.dtype = torch.float16
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").half()
    gen = torch.Generator(device=fill_device).manual_seed(0)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen, device=fill_device))
        else:  # random values made where it is fast, then moved to the CPU-resident model
            p.data.copy_(torch.randn(p.shape, generator=gen, device=fill_device, dtype=torch.float16).mul_(0.02))
    # Non-persistent buffers (rotary inv_freq) are garbage after to_empty: rebuild them.
    model.model.rotary_emb = LlamaRotaryEmbedding(config)
    return model.eval()


@torch.no_grad()
def wikitext_ppl(model, tok, windows: int, seqlen: int = 512) -> float:
    """exp(mean NLL) over the first `windows` non-overlapping windows of wiki.test.raw (float32)."""
    import math

    from awq_edge.reference import SHARED_DIR

    text = (SHARED_DIR / "data/wikitext-2-raw/wiki.test.raw").read_text(encoding="utf-8")
    ids = tok(text, return_tensors="pt").input_ids[0]
    model.float()
    nll, count = 0.0, 0
    for w in range(windows):
        x = ids[w * seqlen:(w + 1) * seqlen][None]
        logp = torch.log_softmax(model(x).logits[0, :-1].float(), dim=-1)
        nll -= logp.gather(1, x[0, 1:, None]).sum().item()
        count += seqlen - 1
    return math.exp(nll / count)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["synthetic", "smollm2"], default="synthetic")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--method", choices=["awq", "rtn"], default="awq")
    ap.add_argument("--w-bit", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--ppl-windows", type=int, default=0,
                    help="smollm2 only: afterwards, WikiText-2 perplexity of the fake-quant model on this many "
                         "512-token windows (shared README protocol)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/quantize_7b_<model>_<device>.json)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)

    t0 = time.perf_counter()
    if args.model == "synthetic":
        model = synthetic_llama(args, "cuda" if dev.type == "cuda" else "cpu")
        calib = torch.randint(0, args.vocab, (args.samples, args.seqlen), generator=torch.Generator().manual_seed(0))
        shape = {k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "heads", "vocab")}
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from awq_edge.calib import load_calibration
        from awq_edge.reference import SHARED_DIR, ensure_reference_fp16

        path = ensure_reference_fp16()
        # CPU computes in fp32 anyway; the model is kept in fp16 like the synthetic one.
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16).eval()
        tok = AutoTokenizer.from_pretrained(path)
        calib = load_calibration(SHARED_DIR / "data/calib/calib_mix_v1.jsonl", tok, args.samples, args.seqlen)
        c = model.config
        shape = {"layers": c.num_hidden_layers, "hidden": c.hidden_size, "intermediate": c.intermediate_size,
                 "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads, "vocab": c.vocab_size}
    build_s = time.perf_counter() - t0

    cfg = QuantConfig(w_bit=args.w_bit, group_size=args.group_size, method=args.method)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    marks: list[float] = []

    def on_layer(i: int) -> None:
        sync()
        marks.append(time.perf_counter())

    sync()
    load_before = os.getloadavg()
    cpu_start = time.process_time()
    start = time.perf_counter()
    results = quantize_model(model, get_adapter(model.config), calib, cfg, device=args.device, on_layer=on_layer)
    sync()
    total_s = time.perf_counter() - start
    cpu_s = time.process_time() - cpu_start
    per_layer = [b - a for a, b in zip([start] + marks[:-1], marks)]  # layer 0 includes the input capture

    record = {
        "benchmark": "quantize_7b",
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "git_commit": git_commit(),
        "device": device_name(args.device),
        "torch": torch.__version__,
        "model": "synthetic Llama-2-7B shape, random fp16 weights" if args.model == "synthetic"
        else "SmolLM2-135M-Instruct FP16 reference",
        "shape": shape,
        "calibration": {"samples": args.samples, "seqlen": args.seqlen,
                        "source": "random tokens" if args.model == "synthetic" else "calib_mix_v1.jsonl, file order"},
        "quant_config": asdict(cfg),
        "quantized_linears": len(results),
        "build_s": round(build_s, 2),
        "total_s": round(total_s, 2),
        "per_layer_s": [round(t, 3) for t in per_layer],
        "mean_layer_s": round(sum(per_layer) / len(per_layer), 3),
        # wall time on a shared CPU depends on the other load; process CPU time does less
        "process_cpu_s": round(cpu_s, 1),
        "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }
    if args.ppl_windows and args.model == "smollm2":
        record["ppl"] = {"windows": args.ppl_windows, "seqlen": 512,
                         "value": round(wikitext_ppl(model, tok, args.ppl_windows), 3)}
    if dev.type == "cuda":
        record["peak_gpu_allocated_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 3)
        record["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved(dev) / 2**30, 3)
        record["goal"] = {"total_s_max": 300, "peak_gpu_gib_max": 8,
                          "met": total_s < 300 and record["peak_gpu_reserved_gib"] < 8}
    print(json.dumps(record, indent=1))
    out = Path(args.out) if args.out else REPO / "benchmarks/results" / f"quantize_7b_{args.model}_{dev.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
