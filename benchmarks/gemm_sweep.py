"""H3b's prefill GEMM sweep and the dlight check of the small decode-side ops, on the H100.

  host:   .venv/bin/python benchmarks/gemm_sweep.py build --out .gpu/H3b/out      (builds sm_90 kernels)
  device: PYTHONPATH=/tmp/tvmrt:.gpu/tvmrt python3 benchmarks/gemm_sweep.py device --carry .gpu/H3b/out --out $OUT
  here:   .venv/bin/python benchmarks/gemm_sweep.py collect DEVICE_JSON            (-> benchmarks/results/)

GEMM: every CudaConfig in CFGS on the Llama-2-7B shapes at M = 2048 (g128), checked against a float32 torch
reference, timed beside cuBLAS FP16 (torch.matmul on the dequantized weights) in the same run; odd shapes
with their automatic config for correctness. Small ops: add+RMSNorm and SiLU*mul with dlight's default
schedules, M = 1 and 2048, timed beside torch eager and reported as GB/s of bytes moved.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def cmd_build(args) -> int:
    sys.path.insert(0, str(REPO))
    from tvm_kernels.cuda_env import check_cubin, prepare_cuda_build

    prepare_cuda_build()
    import tvm
    from tvm import te, tirx
    from tvm.s_tir import dlight as dl

    from tvm_kernels.gemm_w4a16 import CudaConfig, cuda_config, gemm_w4a16, valid_config
    from tvm_kernels.targets import get_target

    t = get_target("cuda-sm90")
    OUT = Path(args.out)
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)

    LLAMA = [("qkv", 12288, 4096), ("o", 4096, 4096), ("gate_up", 22016, 4096), ("down", 4096, 11008)]
    CFGS = [CudaConfig(4, 4, 2, 2, 4), CudaConfig(2, 4, 4, 2, 4), CudaConfig(2, 2, 4, 4, 2), CudaConfig(2, 4, 4, 4, 2),
            CudaConfig(4, 2, 2, 4, 4), CudaConfig(2, 2, 4, 4, 4), CudaConfig(2, 4, 4, 4, 4), CudaConfig(4, 2, 4, 4, 2),
            CudaConfig(4, 4, 4, 2, 2)]
    funcs, plan = {}, {"gemm": [], "ops": [], "default": {}}
    for label, N, K in LLAMA:
        plan["default"][label] = dataclasses.asdict(cuda_config(N, K, t))
        for j, c in enumerate(CFGS):
            assert valid_config(c), c
            name = f"gemm_{label}_c{j}"
            funcs[name] = gemm_w4a16(N, K, 128, t, config=c).with_attr("global_symbol", name)
            plan["gemm"].append({"name": name, "label": label, "N": N, "K": K, "G": 128, "config": dataclasses.asdict(c)})
    # odd shapes with their automatic config (what export gets), for correctness
    for i, (N, K, G) in enumerate([(100, 576, 64), (960, 352, 32), (1536, 576, 64), (576, 1536, 64)]):
        name = f"gemm_odd_default{i}"
        funcs[name] = gemm_w4a16(N, K, G, t).with_attr("global_symbol", name)
        plan["gemm"].append({"name": name, "label": "odd", "N": N, "K": K, "G": G, "config": dataclasses.asdict(cuda_config(N, K, t))})
    # a couple of odd shapes with the sweep configs, for correctness
    for j, c in enumerate(CFGS):
        name = f"gemm_odd_c{j}"
        funcs[name] = gemm_w4a16(100, 576, 64, t, config=c).with_attr("global_symbol", name)
        plan["gemm"].append({"name": name, "label": "odd", "N": 100, "K": 576, "G": 64, "config": dataclasses.asdict(c)})

    def add_rmsnorm(M, H):
        Mv = tirx.Var("M", "int64") if M is None else M
        x = te.placeholder((Mv, H), "float16", name="x"); r = te.placeholder((Mv, H), "float16", name="res")
        w = te.placeholder((H,), "float16", name="w")
        s = te.compute((Mv, H), lambda i, j: x[i, j] + r[i, j], name="add")
        k = te.reduce_axis((0, H), name="k")
        ss = te.compute((Mv,), lambda i: te.sum(s[i, k].astype("float32") * s[i, k].astype("float32"), axis=k), name="ss")
        y = te.compute((Mv, H), lambda i, j: (s[i, j].astype("float32") * tirx.rsqrt(ss[i] / H + 1e-5)).astype("float16") * w[j], name="y")
        return te.create_prim_func([x, r, w, s, y])

    def silu_mul(M, I):
        Mv = tirx.Var("M", "int64") if M is None else M
        g = te.placeholder((Mv, 2 * I), "float16", name="gu")
        y = te.compute((Mv, I), lambda i, j: (g[i, j] * tirx.sigmoid(g[i, j])) * g[i, j + I], name="y")
        return te.create_prim_func([g, y])

    rules = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback())
    ops = {}
    for H in (576, 4096):
        for M in (1, 2048):
            ops[f"addnorm_h{H}_m{M}"] = (add_rmsnorm(M, H), {"op": "add_rmsnorm", "H": H, "M": M, "bytes": M * H * 2 * 4 + H * 2})
    for I in (1536, 11008):
        for M in (1, 2048):
            ops[f"silumul_i{I}_m{M}"] = (silu_mul(M, I), {"op": "silu_mul", "I": I, "M": M, "bytes": M * I * 2 * 3})
    with tvm.target.Target(t.tvm_target()) as target:
        sched = rules(tvm.IRModule({k: f.with_attr("global_symbol", k) for k, (f, _) in ops.items()}))
    for k, (_, meta) in ops.items():
        funcs[k] = sched[k]
        plan["ops"].append({"name": k, **meta})
    t0 = time.time()
    with t.tvm_target() as target:
        lib = tvm.compile(tvm.IRModule(funcs), target=target)
    lib.export_library(str(OUT / "sm90.so"))
    print("built", len(funcs), "in", round(time.time() - t0, 1), "s", check_cubin(OUT / "sm90.so", "sm_90"))
    plan["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    plan["command"] = " ".join(sys.argv)
    (OUT / "plan.json").write_text(json.dumps(plan, indent=1))
    return 0


def cmd_device(args) -> int:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import torch

    import _device_kernels as D  # H3's helpers: loads the TVM runtime, reference, CUDA-graph timing

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "gemm_sweep_device.json"
    here = Path(args.carry)
    plan = json.loads((here / "plan.json").read_text())
    mod = D.tvm_ffi.load_module(str(here / "sm90.so"))
    gen = torch.Generator(device="cuda"); gen.manual_seed(0)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": plan.get("commit"),
           "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "plan_command": plan.get("command"), "gemm": [], "ops": [], "default": plan["default"]}
    cublas = {}
    for k in plan["gemm"]:
        try:
            fn = mod[k["name"]]
            M = 2048 if k["label"] != "odd" else 17
            chk = D.check_gemv(fn, {**k, "M": M}, gen)
            row = {**k, **chk}
            if k["label"] != "odd":
                r = D.bench_gemm(fn, k, gen) if k["label"] not in cublas else None
                if r is None:
                    N, K, G = k["N"], k["K"], k["G"]
                    w, s, z = D.rand_kernel_tensors(N, K, G, gen)
                    x = torch.randn((2048, K), device="cuda", generator=gen).half()
                    y = torch.empty((2048, N), device="cuda", dtype=torch.float16)
                    args = [D.ffi(x), D.ffi(D.as_u32(w)), D.ffi(s), D.ffi(z), D.ffi(y)]
                    sec, spread = D.time_graph([lambda: fn(*args)], reps_min=20)
                    c = cublas[k["label"]]
                    flops = 2 * 2048 * N * K
                    r = {"M": 2048, "us": sec * 1e6, "TFLOPs": flops / sec / 1e12, "cublas_us": c["cublas_us"],
                         "cublas_TFLOPs": c["cublas_TFLOPs"], "ratio_vs_cublas": c["cublas_us"] / (sec * 1e6), "spread": spread}
                else:
                    cublas[k["label"]] = r
                row.update(r)
                D.log(f"{k['name']:20s} ok={chk['ok']} err={chk['rel_err']:.1e} {r['us']:8.1f} us {r['TFLOPs']:6.1f} TF cuBLAS {r['cublas_TFLOPs']:6.1f} ratio {r['ratio_vs_cublas']:.2f}")
            else:
                D.log(f"{k['name']:20s} ok={chk['ok']} err={chk['rel_err']:.1e}")
            res["gemm"].append(row)
        except Exception as e:
            res["gemm"].append({**k, "error": traceback.format_exc()[-1500:]}); D.log(k["name"], "ERROR", e)
    res_path.write_text(json.dumps(res, indent=1))  # partial results survive a timeout in the ops part
    for k in plan["ops"]:
        try:
            fn = mod[k["name"]]; M = k["M"]
            if k["op"] == "add_rmsnorm":
                H = k["H"]
                x, r = [torch.randn((M, H), device="cuda", generator=gen).half() for _ in range(2)]
                w = torch.rand((H,), device="cuda", generator=gen).half()
                s, y = torch.empty_like(x), torch.full_like(x, float("nan"))
                args = [D.ffi(a) for a in (x, r, w, s, y)]
                fn(*args); torch.cuda.synchronize()
                sf = (x.float() + r.float()); ref = (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + 1e-5)).half().float() * w.float()
                err = float((y.float() - ref).norm() / ref.norm())
                def eager():
                    s2 = x + r
                    return torch.nn.functional.rms_norm(s2, (H,), w, 1e-5)
            else:
                I = k["I"]
                g = torch.randn((M, 2 * I), device="cuda", generator=gen).half()
                y = torch.full((M, I), float("nan"), device="cuda", dtype=torch.float16)
                args = [D.ffi(g), D.ffi(y)]
                fn(*args); torch.cuda.synchronize()
                ref = torch.nn.functional.silu(g[:, :I].float()) * g[:, I:].float()
                err = float((y.float() - ref).norm() / ref.norm())
                def eager():
                    return torch.nn.functional.silu(g[:, :I]) * g[:, I:]
            sec, _ = D.time_graph([lambda: fn(*args)], reps_min=200)
            sec_t, _ = D.time_graph([eager], reps_min=200)
            row = {**k, "rel_err": err, "us": sec * 1e6, "GBps": k["bytes"] / sec / 1e9, "torch_eager_us": sec_t * 1e6}
            D.log(f"{k['name']:22s} err={err:.1e} {row['us']:7.2f} us {row['GBps']:7.0f} GB/s  torch eager {row['torch_eager_us']:7.2f} us")
            res["ops"].append(row)
        except Exception as e:
            res["ops"].append({**k, "error": traceback.format_exc()[-1500:]}); D.log(k["name"], "ERROR", e)
    res_path.write_text(json.dumps(res, indent=1))
    return 0


def cmd_collect(args) -> int:
    data = json.loads(Path(args.device_json).read_text())
    RESULTS.mkdir(parents=True, exist_ok=True)
    dest = RESULTS / args.name
    dest.write_text(json.dumps(data, indent=1))
    print(f"wrote {dest}")
    for r in data["gemm"]:
        if "us" in r:
            print(f"{r['name']:20s} {r['config']} {r['TFLOPs']:6.1f} TF/s vs cuBLAS {r['cublas_TFLOPs']:6.1f} "
                  f"({r['ratio_vs_cublas']:.2f}) ok={r.get('ok')}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", default=".gpu/H3b/out")
    b.set_defaults(func=cmd_build)
    d = sub.add_parser("device")
    d.add_argument("--carry", default=".gpu/H3b/out")
    d.add_argument("--out", required=True)
    d.set_defaults(func=cmd_device)
    c = sub.add_parser("collect")
    c.add_argument("device_json")
    c.add_argument("--name", default="gemm_sweep_h100.json")
    c.set_defaults(func=cmd_collect)
    args = p.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
