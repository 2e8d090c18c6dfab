"""Decode GEMVs fed by TMA bulk copies (tvm_kernels/gemv_w4a16_tma.py) against the committed register-loading
GEMV (tvm_kernels/gemv_w4a16.py), both with PDL as export builds them: the 7B layer's four shapes and SmolLM2's.
Checked against torch float32, then timed cold (weight copies rotated through 256 MB, CUDA graphs) in
alternating rounds. H100.

  .venv/bin/python benchmarks/gemv_tma.py build [--out .gpu/tma]           # here: cubins, no GPU needed
  PYTHONPATH=/tmp/tvmrt:.gpu/tvmrt python3 benchmarks/gemv_tma.py device --lib .gpu/tma/tma.so --out $OUT/tma.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name -> (N, K, G, glu)
SHAPES = {"l7b_qkv": (12288, 4096, 128, None), "l7b_o": (4096, 4096, 128, None), "l7b_gate_up": (22016, 4096, 128, "silu"),
          "l7b_down": (4096, 11008, 128, None), "smol_qkv": (960, 576, 64, None), "smol_o": (576, 576, 64, None),
          "smol_gate_up": (3072, 576, 64, "silu"), "smol_down": (576, 1536, 64, None)}
# variant -> TmaConfig kwargs (None: the committed kernel)
VARIANTS = {"regs": None, "tma_w16r2s2": {"warps": 16, "rows": 2, "stages": 2},
            "hoist_w16r2s2": {"warps": 16, "rows": 2, "stages": 2, "hoist": True},
            "hoist_w16r2": {"warps": 16, "rows": 2, "hoist": True},
            "hoist_w8r2": {"warps": 8, "rows": 2, "hoist": True},
            "hoist_w16r1": {"warps": 16, "rows": 1, "hoist": True},
            "hoist_w8r1": {"warps": 8, "rows": 1, "hoist": True},
            "hoist_w16r2s2_nocopy": {"warps": 16, "rows": 2, "stages": 2, "hoist": True, "diag": "nocopy"}}
# diag variants (wrong results by design, tvm_kernels/gemv_w4a16_tma `diag`) are timed, not checked


def cmd_build(args) -> int:
    from tvm_kernels.cuda_env import check_cubin, prepare_cuda_build

    prepare_cuda_build()
    import tvm

    from tvm_kernels.gemv_w4a16 import gemv_w4a16
    from tvm_kernels.gemv_w4a16_tma import TmaConfig, gemv_w4a16_tma
    from tvm_kernels.pdl import with_pdl
    from tvm_kernels.targets import get_target

    t = get_target("cuda-sm90")
    from tvm_kernels.errors import UserError

    funcs = {}
    for v, kw in VARIANTS.items():
        for name, (N, K, G, glu) in SHAPES.items():
            try:
                f = gemv_w4a16(N, K, G, t, glu=glu) if kw is None else gemv_w4a16_tma(
                    N, K, G, t, TmaConfig(**{k_: v_ for k_, v_ in kw.items() if k_ != "diag"}), glu=glu,
                    diag=kw.get("diag", ""))
            except UserError as e:  # a tiling that does not fit this shape
                print(f"{name}/{v}: {e}")
                continue
            funcs[f"{name}/{v}"] = with_pdl(f)
    mod = tvm.IRModule({k.replace("/", "__"): f.with_attr("global_symbol", k.replace("/", "__")) for k, f in funcs.items()})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with t.tvm_target() as target:
        lib = tvm.compile(mod, target=target)
    lib.export_library(str(out / "tma.so"))
    check_cubin(out / "tma.so", "sm_90")
    print(out / "tma.so", flush=True)
    return 0


def cmd_device(args) -> int:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import torch

    import _device_kernels as dk

    mod = dk.tvm_ffi.load_module(args.lib)
    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)
    def has(fname):
        try:
            mod[fname]
            return True
        except Exception:
            return False

    res: dict = {"device": torch.cuda.get_device_name(), "command": " ".join(sys.argv), "check": {}, "rounds": []}
    for name, (N, K, G, glu) in SHAPES.items():
        k = {"N": N, "K": K, "G": G, "M": 1, "kind": "gemv_glu" if glu else "gemv", "act": glu}
        for v in VARIANTS:
            if not has(f"{name}__{v}") or "diag" in (VARIANTS[v] or {}):
                continue
            c = dk.check_gemv_variant(mod[f"{name}__{v}"], k, gen)
            res["check"][f"{name}/{v}"] = c
            print(name, v, c, flush=True)
    data = {}
    for name, (N, K, G, glu) in SHAPES.items():
        copies = dk.copies_for(N * K // 2)
        W = [tuple(dk.ffi(a) for a in (dk.as_u32(w), s, z)) for w, s, z in
             (dk.rand_kernel_tensors(N, K, G, gen) for _ in range(copies))]
        X = dk.ffi(torch.randn(1, K, device="cuda").half())
        Y = dk.ffi(torch.empty(1, N // 2 if glu else N, device="cuda").half())
        data[name] = (W, X, Y)
    for rnd in range(args.rounds):
        row = {}
        for name in SHAPES:
            W, X, Y = data[name]
            for v in VARIANTS:
                if not has(f"{name}__{v}"):
                    continue
                f = mod[f"{name}__{v}"]
                t, _ = dk.time_graph([(lambda w=w: f(X, *w, Y)) for w in W])
                row[f"{name}/{v}"] = t * 1e6
        res["rounds"].append(row)
        print(f"round {rnd}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
    res["median_us"] = {k: statistics.median(r[k] for r in res["rounds"]) for k in res["rounds"][0]}
    for name, (N, K, G, glu) in SHAPES.items():
        nbytes = N * K // 2 + 2 * N * (K // G) * 2
        base = res["median_us"][f"{name}/regs"]
        print(f"{name:13s} " + "  ".join(
            f"{v} {res['median_us'][f'{name}/{v}']:6.2f} ({nbytes / res['median_us'][f'{name}/{v}'] / 1e6:.2f} TB/s, "
            f"x{base / res['median_us'][f'{name}/{v}']:.2f})" for v in VARIANTS if f"{name}/{v}" in res["median_us"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", default=str(REPO / ".gpu" / "tma"))
    b.set_defaults(func=cmd_build)
    d = sub.add_parser("device")
    d.add_argument("--lib", default=".gpu/tma/tma.so")
    d.add_argument("--rounds", type=int, default=3)
    d.add_argument("--out", required=True)
    d.set_defaults(func=cmd_device)
    a = ap.parse_args()
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
