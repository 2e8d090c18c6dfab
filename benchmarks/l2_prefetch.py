"""Is a decode GEMV bound by DRAM, and does prefetching the next GEMV's matrix into L2 pay? (H100)

The 7B layer's four decode GEMVs timed in CUDA graphs with their weights cold (8 copies rotated, 285 MB > the
50 MB L2) and hot (one copy, L2-resident where it fits); then qkv followed by o_proj, copies rotated, with qkv
plain or prefetching o_proj's whole matrix (gemv_w4a16's L2Prefetch epilogue); then that qkv alone.

  .venv/bin/python benchmarks/l2_prefetch.py build [--out .gpu/l2]          # here: cubins, no GPU needed
  PYTHONPATH=/tmp/tvmrt:.gpu/tvmrt python3 benchmarks/l2_prefetch.py device --lib .gpu/l2/l2.so --out $OUT/l2.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "down": (4096, 11008), "gu": (22016, 4096)}
G = 128
COPIES = 8


def cmd_build(args) -> int:
    from tvm_kernels.cuda_env import check_cubin, prepare_cuda_build

    prepare_cuda_build()
    import tvm

    from tvm_kernels.gemv_w4a16 import L2Prefetch, gemv_w4a16
    from tvm_kernels.targets import get_target

    t = get_target("cuda-sm90")
    funcs = {k: gemv_w4a16(N, K, G, t) for k, (N, K) in SHAPES.items()}
    funcs["qkv_pf"] = gemv_w4a16(*SHAPES["qkv"], G, t, prefetch=L2Prefetch(*SHAPES["o"], G, SHAPES["o"][0]))
    mod = tvm.IRModule({k: f.with_attr("global_symbol", k) for k, f in funcs.items()})
    with t.tvm_target() as target:
        lib = tvm.compile(mod, target=target)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lib.export_library(str(out / "l2.so"))
    check_cubin(out / "l2.so", "sm_90")
    print(out / "l2.so")
    return 0


def cmd_device(args) -> int:
    if not Path(args.lib).is_file():
        raise SystemExit(f"l2_prefetch.py device: --lib {args.lib}: no such file (run `l2_prefetch.py build` here first)")
    sys.path.insert(0, str(REPO / "benchmarks"))
    import torch

    import _device_kernels as dk  # the same timing (CUDA graphs, medians) and random weights as kernels.py

    m = dk.tvm_ffi.load_module(args.lib)
    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)
    W = {k: dk.weight_copies(N, K, G, COPIES, gen) for k, (N, K) in SHAPES.items()}
    X = {k: dk.ffi(torch.randn(1, K, device="cuda").half()) for k, (N, K) in SHAPES.items()}
    Y = {k: dk.ffi(torch.empty(1, N, device="cuda").half()) for k, (N, K) in SHAPES.items()}

    def call(fname, name, i, pf=None):
        f = m[fname]
        extra = W[pf][i] if pf else ()
        return lambda: f(X[name], *W[name][i], *extra, Y[name])

    res: dict = {"device": torch.cuda.get_device_name(), "command": " ".join(sys.argv), "gemv": {}, "pairs": []}
    for name in SHAPES:
        cold, _ = dk.time_graph([call(name, name, i) for i in range(COPIES)])
        hot, _ = dk.time_graph([call(name, name, 0)])
        res["gemv"][name] = {"cold_us": cold * 1e6, "hot_us": hot * 1e6}
        print(f"{name:5s} cold {cold * 1e6:6.2f} us, hot (L2) {hot * 1e6:6.2f} us", flush=True)

    def pair(pf: bool):
        return [c for i in range(COPIES) for c in (call("qkv_pf" if pf else "qkv", "qkv", i, "o" if pf else None),
                                                   call("o", "o", i))]

    for _ in range(3):
        a, _ = dk.time_graph(pair(False))
        b, _ = dk.time_graph(pair(True))
        res["pairs"].append({"qkv_then_o_us": a * 2e6, "qkv_prefetching_o_then_o_us": b * 2e6})
        print(f"qkv + o: {a * 2e6:.2f} us, qkv prefetching o + o: {b * 2e6:.2f} us", flush=True)
    alone, _ = dk.time_graph([call("qkv_pf", "qkv", i, "o") for i in range(COPIES)])
    res["qkv_prefetching_o_alone_us"] = alone * 1e6
    print(f"qkv prefetching o, alone: {alone * 1e6:.2f} us")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", default=str(REPO / ".gpu" / "l2"))
    b.set_defaults(func=cmd_build)
    d = sub.add_parser("device")
    d.add_argument("--lib", default=".gpu/l2/l2.so")
    d.add_argument("--out", required=True)
    d.set_defaults(func=cmd_device)
    a = ap.parse_args()
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
