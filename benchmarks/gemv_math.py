"""How much of a decode GEMV's time is its dequantize math? (H100)

The decode GEMVs of the 7B layer, SmolLM2, Llama-3.2-1B and Gemma3-1B (the tilings export picks) built two
ways: the committed inner step ("f16x2": 15 instructions per 8 weights) and a floor with the math taken out
(weights loaded and XORed, no dequantize or multiply: not a GEMV, only a bound on what less math could
give). Timed cold (weight copies rotated through 256 MB, CUDA graphs) in alternating rounds.
A third variant, Marlin's dequantize ("lop3", 13 instructions; CudaConfig.math), lived in the experiment
commit cc67fec: x1.05 on SmolLM2's GEMVs alone but x0.96-1.00 end to end (gemv_math_h100.json), not kept.

  .venv/bin/python benchmarks/gemv_math.py build [--out .gpu/gm]          # here: cubins, no GPU needed
  PYTHONPATH=/tmp/tvmrt:.gpu/tvmrt python3 benchmarks/gemv_math.py device --lib-dir .gpu/gm --out $OUT/gm.json
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
          "smol_gate_up": (3072, 576, 64, "silu"), "smol_down": (576, 1536, 64, None),
          # Llama-3.2-1B (g128) and Gemma3-1B (g64): cuda_config's other branches
          "l1b_qkv": (3072, 2048, 128, None), "l1b_o": (2048, 2048, 128, None), "l1b_gate_up": (16384, 2048, 128, "silu"),
          "l1b_down": (2048, 8192, 128, None), "g1b_qkv": (1536, 1152, 64, None), "g1b_o": (1152, 1024, 64, None),
          "g1b_gate_up": (13824, 1152, 64, "gelu_tanh"), "g1b_down": (1152, 6912, 64, None)}
VARIANTS = ("f16x2", "floor")
_FLOOR_SOURCE = r"""
__device__ __forceinline__ unsigned awq_w4_fma8(unsigned w, unsigned x0, unsigned x1, unsigned x2, unsigned x3,
                                                unsigned zz, unsigned acc) {
  return acc ^ w ^ x0 ^ x3;
}
"""


def cmd_build(args) -> int:
    from tvm_kernels.cuda_env import check_cubin, prepare_cuda_build

    prepare_cuda_build()
    import tvm

    import tvm_kernels.gemv_w4a16 as g
    from tvm_kernels.targets import get_target

    t = get_target("cuda-sm90")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    committed = g._H2_SOURCE
    for v in VARIANTS:
        g._H2_SOURCE = _FLOOR_SOURCE if v == "floor" else committed  # read when the kernel's TVMScript is parsed
        funcs = {}
        for name, (N, K, G, glu) in SHAPES.items():
            funcs[name] = g.gemv_w4a16(N, K, G, t, glu=glu)
        g._H2_SOURCE = committed
        mod = tvm.IRModule({k: f.with_attr("global_symbol", k) for k, f in funcs.items()})
        with t.tvm_target() as target:
            lib = tvm.compile(mod, target=target)
        lib.export_library(str(out / f"{v}.so"))
        check_cubin(out / f"{v}.so", "sm_90")
        print(out / f"{v}.so", flush=True)
    return 0


def cmd_device(args) -> int:
    libs = {v: Path(args.lib_dir) / f"{v}.so" for v in VARIANTS}
    for v, p in libs.items():
        if not p.is_file():
            raise SystemExit(f"gemv_math.py device: --lib-dir {args.lib_dir}: no {p.name} (run `gemv_math.py build` here first)")
    sys.path.insert(0, str(REPO / "benchmarks"))
    import torch

    import _device_kernels as dk  # the same timing (CUDA graphs, medians) and random weights as kernels.py

    mods = {v: dk.tvm_ffi.load_module(str(p)) for v, p in libs.items()}
    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)
    res: dict = {"device": torch.cuda.get_device_name(), "command": " ".join(sys.argv), "check": {}, "rounds": [],
                 "median_us": {}}
    for name, (N, K, G, glu) in SHAPES.items():
        k = {"N": N, "K": K, "G": G, "M": 1, "kind": "gemv_glu" if glu else "gemv", "act": glu}
        res["check"][name] = dk.check_gemv_variant(mods["f16x2"][name], k, gen)
        print(name, res["check"][name], flush=True)
    data = {}
    for name, (N, K, G, glu) in SHAPES.items():
        W = dk.weight_copies(N, K, G, dk.copies_for(N * K // 2), gen)
        X = dk.ffi(torch.randn(1, K, device="cuda").half())
        Y = dk.ffi(torch.empty(1, N // 2 if glu else N, device="cuda").half())
        data[name] = (W, X, Y)
    for rnd in range(args.rounds):
        row = {}
        for name in SHAPES:
            W, X, Y = data[name]
            for v in VARIANTS:
                f = mods[v][name]
                t, _ = dk.time_graph([(lambda w=w: f(X, *w, Y)) for w in W])
                row[f"{name}/{v}"] = t * 1e6
        res["rounds"].append(row)
        print(f"round {rnd}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
    for key in res["rounds"][0]:
        res["median_us"][key] = statistics.median(r[key] for r in res["rounds"])
    for name in SHAPES:
        m = {v: res["median_us"][f"{name}/{v}"] for v in VARIANTS}
        print(f"{name:13s} f16x2 {m['f16x2']:6.2f} us  floor {m['floor']:6.2f} (x{m['f16x2'] / m['floor']:.3f})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", default=str(REPO / ".gpu" / "gm"))
    b.set_defaults(func=cmd_build)
    d = sub.add_parser("device")
    d.add_argument("--lib-dir", default=".gpu/gm")
    d.add_argument("--rounds", type=int, default=5)
    d.add_argument("--out", required=True)
    d.set_defaults(func=cmd_device)
    a = ap.parse_args()
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
