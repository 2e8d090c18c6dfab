"""Device side of benchmarks/gemm_sm90.py (torch + the TVM runtime bundle only).

usage: PYTHONPATH=/tmp/tvmrt:.gpu/tvmrt python3 _device_gemm_sm90.py CARRY_DIR OUT_DIR -> OUT_DIR/gemm_sm90_device.json
"""
from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

# the kernel-layout tensors, their dequantization and CUDA-graph timing are shared with the kernel benchmark
from _device_kernels import DEV, dequant, ffi, rand_kernel_tensors, time_graph, tvm_ffi

TOL = 2e-3  # relative L2 error: fp32 accumulation, fp16 output (~2e-4 expected)


def main():
    carry, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    plan = json.loads((carry / "plan.json").read_text())
    lib = tvm_ffi.load_module(str(carry / "gemm.so"))
    props = torch.cuda.get_device_properties(0)
    res = {"device": f"{props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}",
           "commit": plan["commit"], "plan_command": plan["command"], "device_command": " ".join(sys.argv),
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "configs": plan["configs"],
           "checks": [], "timing": []}
    print(res["device"], flush=True)
    gen = torch.Generator(device=DEV)
    gen.manual_seed(0)
    data, base = {}, {}
    for k in plan["kernels"]:
        N, K, G, label = k["N"], k["K"], k["G"], k["label"]
        if label not in data:
            w, s, z = rand_kernel_tensors(N, K, G, gen)
            data[label] = (w, s, z, dequant(w, s, z, G).half())
        w, s, z, Wh = data[label]
        fn = lib[k["name"]]
        ok = True
        if k["check"]:
            for M in (1, 77, 2048):
                x = torch.randn((M, K), device=DEV, generator=gen).half()
                y = torch.full((M, N), float("nan"), device=DEV, dtype=torch.float16)
                fn(ffi(x), ffi(w.view(torch.uint32)), ffi(s), ffi(z), ffi(y))
                torch.cuda.synchronize()
                ref = x.float() @ Wh.float().T
                err = ((y.float() - ref).norm() / ref.norm()).item()
                good = bool(torch.isfinite(y).all().item()) and err < TOL
                ok = ok and good
                res["checks"].append({"name": k["name"], "M": M, "rel_err": err, "ok": good})
                print(f"check {k['name']:22s} M={M:5d} {'OK ' if good else 'BAD'} {err:.2e}", flush=True)
        if not ok:
            continue
        for M in (128, 256, 512, 1024, 2048):
            x = torch.randn((M, K), device=DEV, generator=gen).half()
            y = torch.empty((M, N), device=DEV, dtype=torch.float16)
            a = [ffi(x), ffi(w.view(torch.uint32)), ffi(s), ffi(z), ffi(y)]
            sec, _ = time_graph([lambda: fn(*a)], reps_min=30)
            if (label, M) not in base:
                o = torch.empty((M, N), device=DEV, dtype=torch.float16)
                base[(label, M)] = time_graph([lambda: torch.matmul(x, Wh.T, out=o)], reps_min=30)[0]
            cb = base[(label, M)]
            fl = 2 * M * N * K
            r = {**k, "M": M, "us": sec * 1e6, "TFLOPs": fl / sec / 1e12, "cublas_us": cb * 1e6,
                 "cublas_TFLOPs": fl / cb / 1e12, "ratio_vs_cublas": cb / sec}
            res["timing"].append(r)
            print(f"time {k['name']:22s} M={M:5d} {r['us']:8.1f} us {r['TFLOPs']:6.1f} TFLOP/s | cuBLAS {r['cublas_us']:8.1f} us "
                  f"{r['cublas_TFLOPs']:6.1f} | {r['ratio_vs_cublas']:.2f}x", flush=True)
        (out / "gemm_sm90_device.json").write_text(json.dumps(res, indent=1))
    # the 7B layer (four GEMMs together) per kind and M, and each shape's export kernel against the portable one
    lines, agg = [], defaultdict(lambda: [0.0, 0.0])
    by = {(r["label"], r["kind"], r["M"]): r for r in res["timing"]}
    for r in res["timing"]:
        if r["label"] in ("qkv", "o", "gate_up", "down"):
            agg[(r["kind"], r["M"])][0] += r["us"]
            agg[(r["kind"], r["M"])][1] += r["cublas_us"]
    res["layer_7b"] = [{"kind": kd, "M": M, "us": v[0], "cublas_us": v[1], "ratio_vs_cublas": v[1] / v[0]}
                       for (kd, M), v in sorted(agg.items())]
    for row in res["layer_7b"]:
        lines.append(f"7B layer {row['kind']:10s} M={row['M']:5d}: {row['us']:8.1f} us, cuBLAS {row['cublas_us']:8.1f} us "
                     f"-> {row['ratio_vs_cublas']:.3f}x cuBLAS")
    for (label, kind, M), r in sorted(by.items()):
        p = by.get((label, "portable", M))
        if kind == "dispatch" and p:
            lines.append(f"{label:12s} M={M:5d}: export kernel {r['us']:8.1f} us ({r['ratio_vs_cublas']:.2f}x cuBLAS), "
                         f"portable {p['us']:8.1f} us ({p['ratio_vs_cublas']:.2f}x) -> {p['us'] / r['us']:.2f}x faster")
    res["checks_ok"] = all(c["ok"] for c in res["checks"])
    lines.insert(0, f"{res['device']}: checks {'all OK' if res['checks_ok'] else 'FAILED'} ({len(res['checks'])})")
    res["summary_lines"] = lines
    print("\n".join(lines))
    (out / "gemm_sm90_device.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
