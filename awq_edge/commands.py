"""`awq-edge quantize` and `awq-edge eval`.

Every flag and input file is checked before the weights are loaded: the model's module tree is
built on the meta device (no memory) to check the group size against every quantized linear.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from awq_edge.errors import UserError
from tvm_kernels.layout import GROUP_SIZES

W_BITS = (3, 4)


def default_calib() -> Path:
    from awq_edge.reference import SHARED_DIR

    return SHARED_DIR / "data" / "calib" / "calib_mix_v1.jsonl"


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_device(device: str) -> str:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (use --device cpu)")
    return device


def peak_rss_gib() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def register(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("quantize", help="AWQ (or RTN) INT4/INT3 quantization -> AutoAWQ GEMM checkpoint")
    q.add_argument("model", help="Hugging Face model folder (config.json + *.safetensors) or a .gguf file")
    q.add_argument("--out", required=True, help="output checkpoint folder")
    q.add_argument("--w-bit", type=int, default=4, help="weight bits: 4 or 3 (default 4)")
    q.add_argument("--group-size", type=int, default=128, help="quantization group along the input dim: 32, 64 or 128 (default 128)")
    q.add_argument("--method", default="awq", help="awq (activation-aware scales + clip search) or rtn (round to nearest)")
    q.add_argument("--calib", default=None, help="calibration text: .jsonl with a \"text\" field or plain text "
                   "(default ../shared/data/calib/calib_mix_v1.jsonl)")
    q.add_argument("--calib-samples", type=int, default=128, help="calibration blocks (default 128)")
    q.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration block (default 512)")
    q.add_argument("--seed", type=int, default=None, help="draw calibration blocks at random with this seed "
                   "(default: the first blocks in file order)")
    q.add_argument("--device", default=None, help="where each decoder block is processed: cuda or cpu (default cuda when present)")
    q.add_argument("--no-duo-scaling", dest="duo_scaling", action="store_false",
                   help="search s = mean|x|^a (llm-awq) instead of mean|x|^a / mean|w|^(1-a) (AutoAWQ, default)")
    q.add_argument("--force", action="store_true", help="replace a non-empty --out")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity of a model or an AWQ checkpoint on WikiText-2")
    e.add_argument("model", help="Hugging Face model folder, AWQ checkpoint folder or .gguf file")
    e.add_argument("--ppl", action="store_true", help="WikiText-2 test perplexity (the only metric so far; on by default)")
    e.add_argument("--data", default=None, help="evaluation text (default ../shared/data/wikitext-2-raw/wiki.test.raw)")
    e.add_argument("--seqlen", type=int, default=512, help="window length in tokens (default 512)")
    e.add_argument("--windows", type=int, default=40, help="number of windows from the start; 0 = all (default 40)")
    e.add_argument("--device", default=None, help="cuda or cpu (default cuda when present); CPU evaluates in float32")
    e.add_argument("--json", default=None, help="also write the result to this JSON file")
    e.set_defaults(func=cmd_eval)


# --------------------------------------------------------------------------- quantize
def validate_quantize(args):
    """All checks that need no weights: returns (folder, config, adapter, QuantConfig, calib path)."""
    from awq_edge import model_io
    from awq_edge.adapters import get_adapter, iter_quantized_linears
    from awq_edge.checkpoint import check_output_dir
    from awq_edge.quantizer import QuantConfig

    if args.w_bit not in W_BITS:
        raise UserError(f"--w-bit {args.w_bit}: expected one of {', '.join(map(str, W_BITS))}")
    if args.group_size not in GROUP_SIZES:
        raise UserError(f"--group-size {args.group_size}: expected one of {', '.join(map(str, GROUP_SIZES))}")
    if args.method not in ("awq", "rtn"):
        raise UserError(f"--method {args.method!r}: expected awq or rtn")
    if args.device not in (None, "cpu", "cuda"):
        raise UserError(f"--device {args.device!r}: expected cuda or cpu")
    calib = None
    if args.method == "awq" or args.calib is not None:
        calib = Path(args.calib) if args.calib is not None else default_calib()
        if not calib.is_file():
            raise UserError(f"{calib}: calibration file not found (--calib expects a .jsonl with a \"text\" field or a plain text file)")
        if args.calib_samples < 1 or args.calib_seqlen < 1:
            raise UserError(f"--calib-samples/--calib-seqlen must be positive (got {args.calib_samples} x {args.calib_seqlen})")
    check_output_dir(Path(args.out), args.force)

    src = Path(args.model)
    if not src.exists():
        raise UserError(f"{src}: no such model folder or GGUF file")
    if src.is_dir():
        model_io.read_config_dict(src)  # config.json first: its error is the clearer one
    folder = model_io.resolve_model_dir(src)
    config = model_io.load_config(folder)
    adapter = get_adapter(config)
    model_io.check_safetensors(folder)
    for name, linear in iter_quantized_linears(model_io.meta_model(config), adapter):
        if linear.in_features % args.group_size:
            raise UserError(
                f"--group-size {args.group_size} does not divide {name}.in_features = {linear.in_features} "
                f"(choose a group size that divides every quantized linear's input dimension)"
            )
        if linear.out_features % 8:
            raise UserError(f"{name}.out_features = {linear.out_features} is not a multiple of 8 (AWQ GEMM packing)")
    qcfg = QuantConfig(w_bit=args.w_bit, group_size=args.group_size, zero_point=True, method=args.method,
                       duo_scaling=args.duo_scaling)
    return folder, config, adapter, qcfg, calib


def cmd_quantize(args) -> int:
    import torch

    from awq_edge import model_io
    from awq_edge.calib import load_calibration
    from awq_edge.checkpoint import save_awq_checkpoint
    from awq_edge.quantizer import quantize_model

    t0 = time.perf_counter()
    folder, config, adapter, qcfg, calib = validate_quantize(args)
    device = _check_device(args.device or default_device())
    tokenizer = model_io.load_tokenizer(folder)
    calib_ids = None
    if calib is not None and qcfg.method == "awq":
        calib_ids = load_calibration(calib, tokenizer, args.calib_samples, args.calib_seqlen, args.seed)
    model, _, config = model_io.load_model(folder, dtype=torch.float16, device="cpu", tokenizer=tokenizer)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_load = time.perf_counter()
    qlinears = quantize_model(model, adapter, calib_ids, qcfg, device=device, progress=True)
    t_quant = time.perf_counter()
    out = save_awq_checkpoint(model, qlinears, qcfg, adapter, args.out, src_dir=folder, tokenizer=tokenizer, force=args.force)
    t_end = time.perf_counter()
    mem = f"peak CPU RSS {peak_rss_gib():.2f} GiB"
    if device == "cuda":
        mem += f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    calib_desc = f"{tuple(calib_ids.shape)} tokens" if calib_ids is not None else "none"
    print(f"wrote {out} ({qcfg.method.upper()} INT{qcfg.w_bit} g{qcfg.group_size}, {len(qlinears)} linears, calibration {calib_desc})")
    print(f"time {t_end - t0:.1f} s (load {t_load - t0:.1f} s, quantize {t_quant - t_load:.1f} s, "
          f"write {t_end - t_quant:.1f} s) on {device}; {mem}")
    return 0


# --------------------------------------------------------------------------- eval
def cmd_eval(args) -> int:
    import torch

    from awq_edge import model_io
    from awq_edge.evaluate import default_eval_file, eval_tokens, perplexity

    if args.device not in (None, "cpu", "cuda"):
        raise UserError(f"--device {args.device!r}: expected cuda or cpu")
    if args.seqlen < 2:
        raise UserError(f"--seqlen must be at least 2 (got {args.seqlen})")
    if args.windows < 0:
        raise UserError(f"--windows must be >= 0 (got {args.windows})")
    data = Path(args.data) if args.data else default_eval_file()
    if not data.is_file():
        raise UserError(f"{data}: evaluation text not found")
    if args.json:
        parent = Path(args.json).parent
        if not parent.is_dir():
            raise UserError(f"--json {args.json}: folder {parent} does not exist")
    device = _check_device(args.device or default_device())
    # CPU has no fast fp16 matmul and accumulates it poorly: evaluate in float32 there.
    dtype = torch.float16 if device == "cuda" else torch.float32
    t0 = time.perf_counter()
    model, tokenizer, _ = model_io.load_any(args.model, dtype=dtype, device=device)
    tokens = eval_tokens(tokenizer, data)
    result = perplexity(model, tokens, seqlen=args.seqlen, windows=args.windows, device=device)
    elapsed = time.perf_counter() - t0
    print(f"{args.model}: perplexity {result['ppl']:.4f} ({result['windows']} windows x {result['seqlen']} tokens, "
          f"{result['tokens']} predicted, {data.name}, {device}, {elapsed:.1f} s)")
    if args.json:
        record = {"model": str(args.model), "data": str(data), "device": device, "dtype": str(dtype).split(".")[-1],
                  "seconds": round(elapsed, 2), "command": " ".join(["awq-edge"] + sys.argv[1:]),
                  "args": {k: v for k, v in vars(args).items() if k != "func"}, **result}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0
