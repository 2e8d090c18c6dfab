"""`awq-edge export` and `awq-edge targets`. Heavy imports (tvm) happen inside the commands."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="compile a quantized (AWQ GEMM) or FP16 model into an artifact folder",
                       description="Lower CHECKPOINT to a TVM Relax module with a paged KV cache for TARGET "
                                   "and write a self-describing artifact folder (manifest.json, model.so, "
                                   "params.safetensors, tokenizer files).")
    p.add_argument("checkpoint", type=Path, help="AWQ GEMM checkpoint folder (quantization_config in config.json) "
                                                 "or an FP16 Hugging Face folder (the FP16 baseline)")
    p.add_argument("--target", required=True, help="build target (see `awq-edge targets`)")
    p.add_argument("--out", required=True, type=Path, help="artifact folder to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--context-length", type=int, default=None,
                   help="maximum tokens per sequence (KV cache size); default min(max_position_embeddings, 4096)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="most tokens per prefill call; default min(context length, 2048)")
    p.add_argument("--kernels", default="tvm_kernels", choices=["tvm_kernels", "dequant"],
                   help="W4 linears: our hand-scheduled kernels (default) or TVM's stock dequantize+matmul")
    p.add_argument("--shard-size", type=float, default=None, metavar="GIB",
                   help="weights in safetensors shards of at most this many GiB each (default 1)")
    p.add_argument("--lm-head", default="fp16", choices=["fp16", "int8"],
                   help="lm_head weights: fp16 (default, as AutoAWQ) or weight-only int8 with fp16 scales per "
                        "row and 32 columns (a tied embedding table shares it)")
    p.add_argument("--cuda-graph", default="auto", choices=["auto", "step", "regions", "off"],
                   help="CUDA targets: how decode replays from CUDA graphs: step (= auto) = the runtime captures each "
                        "whole decode step (one launch per token), regions = TVM's graphs of the stretches between "
                        "KV-cache calls, off")
    p.add_argument("--pdl", default="auto", choices=["auto", "on", "off"],
                   help="programmatic dependent launch: each kernel starts while the previous one finishes "
                        "(decode +5%% on a 7B, +17-20%% on SmolLM2, H100); auto = on where the target has it (sm_90+)")
    p.set_defaults(func=_export)

    t = sub.add_parser("targets", help="list the build targets")
    t.add_argument("--json", action="store_true", help="machine-readable output")
    t.set_defaults(func=_targets)


def _export(args) -> int:
    from export.errors import UserError
    from export.exporter import export_checkpoint

    from export.exporter import SHARD_BYTES

    for flag, v in (("--context-length", args.context_length), ("--prefill-chunk", args.prefill_chunk)):
        if v is not None and v < 1:
            raise UserError(f"{flag} {v}: expected a positive number of tokens")
    if args.shard_size is not None and args.shard_size <= 0:
        raise UserError(f"--shard-size {args.shard_size}: expected a positive number of GiB")
    shard = SHARD_BYTES if args.shard_size is None else max(1, int(args.shard_size * 2**30))
    summary = export_checkpoint(args.checkpoint, args.target, args.out, force=args.force,
                                context_length=args.context_length, prefill_chunk=args.prefill_chunk,
                                kernels=args.kernels, cuda_graph=args.cuda_graph, shard_bytes=shard,
                                lm_head=args.lm_head, pdl=args.pdl)
    mb = summary["artifact_bytes"] / 2**20
    print(f"wrote {summary['out']} ({summary['target']}, {'AWQ' if summary['quantized'] else 'FP16'}): "
          f"{mb:.1f} MiB in {summary['total_s']:.1f} s (compile {summary['compile_s']:.1f} s)")
    return 0


def _targets(args) -> int:
    from tvm_kernels.targets import list_targets

    targets = list_targets()
    if args.json:
        print(json.dumps([t.summary() for t in targets], indent=2))
        return 0
    width = max(len(t.name) for t in targets)
    for t in targets:
        host = f"host {t.host_triple}" + (f" via {t.cross_compiler}" if t.cross_compiler else "")
        print(f"{t.name:<{width}}  {t.description}; {host}")
    return 0
