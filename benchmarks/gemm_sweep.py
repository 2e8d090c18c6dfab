"""Prefill GEMM sweep on the H100: tilings of tvm_kernels/gemm_w4a16.py beside cuBLAS FP16, M = 512 and 2048.

  host:   .venv/bin/python benchmarks/gemm_sweep.py build --out .gpu/G2/out   [--fp16] [--ops]  (sm_90 kernels)
  device: pip install -q --no-deps --target /tmp/tvmrt .gpu/tvmrt/*.whl &&
          PYTHONPATH=/tmp/tvmrt:.gpu/tvmrt python3 benchmarks/gemm_sweep.py device --carry .gpu/G2/out --out $OUT
  here:   .venv/bin/python benchmarks/gemm_sweep.py collect DEVICE_JSON            (-> benchmarks/results/)

GEMM: every CudaConfig in _sweep_configs (WMMA and ldmatrix + mma.sync fragments) on the Llama-2-7B shapes
(g128), the automatic config (what export gets) on those and the SmolLM2 shapes (g64), and the kernel as it
is at git `--baseline-rev` (default HEAD) with its automatic config, for the before/after ratio in the same
run. All are built with the mma build settings (MMA_BUILD_CONFIG + mma_tir_pipeline(); the WMMA kernels
need only BUILD_CONFIG and build the same either way). Every kernel is first checked against a float32 torch
reference (M = 2048 and an odd M; output poisoned with NaN) and only then timed (CUDA graphs, median).
cuBLAS FP16 is torch.matmul on the dequantized weights, timed in the same run at the same M. Odd shapes (N
not a multiple of 64, K not of 256, K = 32 and 64) are checked for correctness only.
`--fp16` adds plain-fp16 GEMMs through the same pipeline (the ceiling without the INT4 work); `--ops` the
dlight check of the small decode-side ops (add+RMSNorm, SiLU*mul) as before.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"

LLAMA = [("qkv", 12288, 4096), ("o", 4096, 4096), ("gate_up", 22016, 4096), ("down", 4096, 11008)]
SMOL = [("smol_qkv", 960, 576), ("smol_o", 576, 576), ("smol_gate_up", 3072, 576), ("smol_down", 576, 1536)]
ODD = [(100, 576, 64), (960, 352, 32), (130, 576, 64), (77, 640, 128), (1536, 576, 64), (576, 1536, 64),
       (96, 64, 64), (200, 32, 32)]
MS = (512, 2048)


def _sweep_configs():
    from tvm_kernels.gemm_w4a16 import CudaConfig as C

    # earlier runs swept 14 + 5 WMMA tilings (all correct, 110-265 TFLOP/s, see the 14tilings JSON and
    # git history); kept: the three cuda_config picks, plus ldmatrix + mma.sync fragments
    mma = dict(fragments="mma", frag_prefetch=0)
    return [C(), C(4, 2, 2, 4, 4, 3, frag_prefetch=0), C(4, 2, 4, 4, 4, 3),
            C(2, 4, 4, 2, 4, 3, **mma), C(4, 2, 2, 4, 4, 3, **mma), C(4, 2, 4, 4, 4, 3, **mma),
            C(4, 4, 2, 2, 4, 3, **mma), C(2, 4, 4, 2, 2, 4, **mma), C(2, 2, 4, 4, 4, 3, **mma)]


def _fp16_gemm(N: int, K: int, cfg):
    """x @ W^T with plain fp16 W through the same schedule minus the dequantize stage: the ceiling of this
    pipeline (WMMA fragments, cp.async) without the INT4 work, beside cuBLAS."""
    from tvm import te, tirx

    from tvm_kernels.gemm_w4a16 import _schedule_cuda

    i64 = lambda v: tirx.IntImm("int64", v)  # noqa: E731
    M = tirx.Var("M", "int64")
    x = te.placeholder((M, i64(K)), "float16", name="x")
    w = te.placeholder((i64(N), i64(K)), "float16", name="w")
    r = te.reduce_axis((i64(0), i64(K)), name="k")
    acc = te.compute((M, i64(N)), lambda m, n: te.sum(x[m, r].astype("float32") * w[n, r].astype("float32"), axis=r),
                     name="matmul")
    y = te.compute((M, i64(N)), lambda m, n: acc[m, n].astype("float16"), name="y")
    return _schedule_cuda(te.create_prim_func([x, w, y]).with_attr("tirx.noalias", True), cfg, fp16_weight=True)


def _baseline_module(rev: str):
    """tvm_kernels/gemm_w4a16.py as it is at git `rev`, imported under another name."""
    src = subprocess.run(["git", "show", f"{rev}:tvm_kernels/gemm_w4a16.py"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "gemm_w4a16_baseline.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("gemm_w4a16_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _small_ops(tvm, te, tirx, dl, t):
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
    with tvm.target.Target(t.tvm_target()):
        sched = rules(tvm.IRModule({k: f.with_attr("global_symbol", k) for k, (f, _) in ops.items()}))
    return {k: (sched[k], meta) for k, (_, meta) in ops.items()}


def cmd_build(args) -> int:
    sys.path.insert(0, str(REPO))
    from tvm_kernels.cuda_env import check_cubin, prepare_cuda_build

    prepare_cuda_build()
    import tvm
    from tvm import te, tirx
    from tvm.s_tir import dlight as dl

    from tvm_kernels.gemm_w4a16 import (MMA_BUILD_CONFIG, CudaConfig, cuda_config, gemm_w4a16, mma_tir_pipeline,
                                        valid_config)
    from tvm_kernels.targets import get_target

    t = get_target("cuda-sm90")
    OUT = Path(args.out)
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    funcs, plan = {}, {"gemm": [], "ops": [], "default": {}}

    def add(name, func, label, N, K, G, cfg, kind, timed=True):
        funcs[name] = func.with_attr("global_symbol", name)
        plan["gemm"].append({"name": name, "label": label, "N": N, "K": K, "G": G, "kind": kind, "timed": timed,
                             "config": dataclasses.asdict(cfg) if cfg is not None else None})

    # the new kernel first: it registers every tensor intrinsic the baseline module then finds registered
    for label, N, K in LLAMA:
        plan["default"][label] = dataclasses.asdict(cuda_config(N, K, t))
        add(f"gemm_{label}_auto", gemm_w4a16(N, K, 128, t), label, N, K, 128, cuda_config(N, K, t), "auto")
        for j, c in enumerate(_sweep_configs()):
            assert valid_config(c), c
            add(f"gemm_{label}_c{j}", gemm_w4a16(N, K, 128, t, config=c), label, N, K, 128, c, "sweep")
    for label, N, K in SMOL:
        plan["default"][label] = dataclasses.asdict(cuda_config(N, K, t))
        add(f"gemm_{label}_auto", gemm_w4a16(N, K, 64, t), label, N, K, 64, cuda_config(N, K, t), "auto")
    mma_odd = CudaConfig(4, 2, 2, 4, 4, 3, fragments="mma", frag_prefetch=0)
    for i, (N, K, G) in enumerate(ODD):
        add(f"gemm_odd{i}_auto", gemm_w4a16(N, K, G, t), "odd", N, K, G, cuda_config(N, K, t), "auto", timed=False)
        c = dataclasses.replace(mma_odd, stages=cuda_config(N, K, t).stages, chunk_k=cuda_config(N, K, t).chunk_k)
        add(f"gemm_odd{i}_mma", gemm_w4a16(N, K, G, t, config=c), "odd", N, K, G, c, "sweep", timed=False)
    if args.fp16:
        for label, N, K in LLAMA:
            for j, c in enumerate(_sweep_configs()[:3]):
                add(f"fp16_{label}_c{j}", _fp16_gemm(N, K, c), label, N, K, 128, c, "fp16_same_pipeline")
    if args.baseline_rev:
        base = _baseline_module(args.baseline_rev)
        for label, N, K in LLAMA:
            add(f"gemm_{label}_baseline", base.gemm_w4a16(N, K, 128, t), label, N, K, 128,
                base.cuda_config(N, K, t), "baseline")
    if args.ops:
        for k, (f, meta) in _small_ops(tvm, te, tirx, dl, t).items():
            funcs[k] = f
            plan["ops"].append({"name": k, **meta})
    t0 = time.time()
    # the mma build settings for every kernel (the WMMA ones do not need them and build the same way)
    with tvm.transform.PassContext(config=MMA_BUILD_CONFIG):
        with t.tvm_target() as target:
            lib = tvm.compile(tvm.IRModule(funcs), target=target, tir_pipeline=mma_tir_pipeline())
    lib.export_library(str(OUT / "sm90.so"))
    print("built", len(funcs), "in", round(time.time() - t0, 1), "s", check_cubin(OUT / "sm90.so", "sm_90"))
    plan["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                    text=True).stdout.strip()
    plan["dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "tvm_kernels/gemm_w4a16.py"], cwd=REPO,
                                        capture_output=True, text=True).stdout.strip())
    plan["baseline_rev"] = args.baseline_rev
    plan["build_config"] = {**MMA_BUILD_CONFIG, "tir_pipeline": mma_tir_pipeline()}
    plan["command"] = " ".join(sys.argv)
    (OUT / "plan.json").write_text(json.dumps(plan, indent=1))
    return 0


def cmd_device(args) -> int:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import torch

    import _device_kernels as D  # loads the TVM runtime; reference, CUDA-graph timing

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "gemm_sweep_device.json"
    here = Path(args.carry)
    plan = json.loads((here / "plan.json").read_text())
    mod = D.tvm_ffi.load_module(str(here / "sm90.so"))
    gen = torch.Generator(device="cuda"); gen.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    res = {"device": f"{props.name} ({props.multi_processor_count} SMs)", "torch": torch.__version__,
           "commit": plan.get("commit"), "kernel_file_dirty": plan.get("dirty"),
           "baseline_rev": plan.get("baseline_rev"),
           "build_config": plan.get("build_config"), "command": " ".join(sys.argv),
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "plan_command": plan.get("command"),
           "gemm": [], "ops": [], "cublas": {}, "default": plan["default"]}
    inputs = {}

    def tensors(N, K, G, M):
        key = (N, K, G, M)
        if key not in inputs:
            inputs.clear()
            torch.cuda.empty_cache()
            w, s, z = D.rand_kernel_tensors(N, K, G, gen)
            x = torch.randn((M, K), device="cuda", generator=gen).half()
            y = torch.empty((M, N), device="cuda", dtype=torch.float16)
            inputs[key] = (x, w, s, z, y)
        return inputs[key]

    def cublas(label, N, K, G, M):
        key = f"{label}_m{M}"
        if key not in res["cublas"]:
            x, w, s, z, _ = tensors(N, K, G, M)
            W = D.dequant(w, s, z, G).half()
            o = torch.empty((M, N), device="cuda", dtype=torch.float16)
            sec, spread = D.time_graph([lambda: torch.matmul(x, W.T, out=o)], reps_min=20, replays=7)
            res["cublas"][key] = {"us": sec * 1e6, "TFLOPs": 2 * M * N * K / sec / 1e12, "spread": spread}
            del W
        return res["cublas"][key]

    def check_fp16(fn, N, K, M):
        # W: the dequantized random INT4 weights in fp16 (what cuBLAS multiplies by as well)
        x, w, s, z, _ = tensors(N, K, 128, M)
        W = D.dequant(w, s, z, 128).half()
        y = torch.full((M, N), float("nan"), device="cuda", dtype=torch.float16)
        fn(D.ffi(x), D.ffi(W), D.ffi(y))
        torch.cuda.synchronize()
        ref = x.float() @ W.float().T
        finite = bool(torch.isfinite(y).all())
        err = float((y.float() - ref).norm() / ref.norm()) if finite else float("nan")
        return {"rel_err": err, "all_written": finite, "ok": finite and err < D.TOL}

    def launch_args(k, M):
        x, w, s, z, y = tensors(k["N"], k["K"], k["G"], M)
        if k["kind"] == "fp16_same_pipeline":
            W = D.dequant(w, s, z, k["G"]).half()
            return [D.ffi(x), D.ffi(W), D.ffi(y)], W
        return [D.ffi(x), D.ffi(D.as_u32(w)), D.ffi(s), D.ffi(z), D.ffi(y)], None

    for k in sorted(plan["gemm"], key=lambda r: (r["N"], r["K"], r["G"])):  # one shape's inputs at a time
        row = dict(k)
        try:
            fn = mod[k["name"]]
            odd_m = 17 if k["label"] == "odd" else 517
            ms = (odd_m, 2048) if k["timed"] else (odd_m, 1)
            if k["kind"] == "fp16_same_pipeline":
                checks = [check_fp16(fn, k["N"], k["K"], m) for m in ms]
            else:
                checks = [D.check_gemv(fn, {**k, "M": m}, gen) for m in ms]
            row["ok"] = all(c["ok"] for c in checks)
            row["rel_err"] = max(c["rel_err"] for c in checks)
            row["checks"] = checks
            msg = f"{k['name']:22s} ok={row['ok']} err={row['rel_err']:.1e}"
            if row["ok"] and k["timed"]:
                for M in MS:
                    args_, keep = launch_args(k, M)
                    sec, spread = D.time_graph([lambda: fn(*args_)], reps_min=20, replays=7)
                    cb = cublas(k["label"], k["N"], k["K"], k["G"], M)
                    tf = 2 * M * k["N"] * k["K"] / sec / 1e12
                    row[f"m{M}"] = {"us": sec * 1e6, "TFLOPs": tf, "spread": spread, "cublas_us": cb["us"],
                                    "cublas_TFLOPs": cb["TFLOPs"], "ratio_vs_cublas": cb["us"] / (sec * 1e6)}
                    msg += f" | M={M} {sec * 1e6:8.1f} us {tf:6.1f} TF ({cb['us'] / (sec * 1e6):.2f}x cuBLAS {cb['TFLOPs']:.0f})"
            D.log(msg)
        except Exception as e:
            row["error"] = traceback.format_exc()[-1500:]
            D.log(k["name"], "ERROR", e)
        res["gemm"].append(row)
        res_path.write_text(json.dumps(res, indent=1))  # partial results survive a timeout
    for k in plan["ops"]:
        try:
            fn = mod[k["name"]]; M = k["M"]
            if k["op"] == "add_rmsnorm":
                H = k["H"]
                x, r = [torch.randn((M, H), device="cuda", generator=gen).half() for _ in range(2)]
                w = torch.rand((H,), device="cuda", generator=gen).half()
                s, y = torch.empty_like(x), torch.full_like(x, float("nan"))
                args_ = [D.ffi(a) for a in (x, r, w, s, y)]
                fn(*args_); torch.cuda.synchronize()
                sf = (x.float() + r.float()); ref = (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + 1e-5)).half().float() * w.float()
                err = float((y.float() - ref).norm() / ref.norm())
                def eager():
                    return torch.nn.functional.rms_norm(x + r, (H,), w, 1e-5)
            else:
                I = k["I"]
                g = torch.randn((M, 2 * I), device="cuda", generator=gen).half()
                y = torch.full((M, I), float("nan"), device="cuda", dtype=torch.float16)
                args_ = [D.ffi(g), D.ffi(y)]
                fn(*args_); torch.cuda.synchronize()
                ref = torch.nn.functional.silu(g[:, :I].float()) * g[:, I:].float()
                err = float((y.float() - ref).norm() / ref.norm())
                def eager():
                    return torch.nn.functional.silu(g[:, :I]) * g[:, I:]
            sec, _ = D.time_graph([lambda: fn(*args_)], reps_min=200)
            sec_t, _ = D.time_graph([eager], reps_min=200)
            row = {**k, "rel_err": err, "us": sec * 1e6, "GBps": k["bytes"] / sec / 1e9, "torch_eager_us": sec_t * 1e6}
            D.log(f"{k['name']:22s} err={err:.1e} {row['us']:7.2f} us {row['GBps']:7.0f} GB/s  torch eager {row['torch_eager_us']:7.2f} us")
            res["ops"].append(row)
        except Exception as e:
            res["ops"].append({**k, "error": traceback.format_exc()[-1500:]}); D.log(k["name"], "ERROR", e)
    res_path.write_text(json.dumps(res, indent=1))
    return 0


def summarize(data) -> dict:
    """Per shape and M: the best checked tiling, the automatic one and the baseline, as ratios to cuBLAS."""
    out = {}
    for r in data["gemm"]:
        for M in MS:
            m = r.get(f"m{M}")
            if not m or not r.get("ok"):
                continue
            key = f"{r['label']}_m{M}"
            s = out.setdefault(key, {"cublas_TFLOPs": round(m["cublas_TFLOPs"], 1)})
            entry = {"name": r["name"], "TFLOPs": round(m["TFLOPs"], 1), "ratio_vs_cublas": round(m["ratio_vs_cublas"], 3)}
            if r["kind"] in ("auto", "baseline"):
                s[r["kind"]] = entry
            if r["kind"] == "fp16_same_pipeline":
                if m["TFLOPs"] > s.get("fp16_same_pipeline", {}).get("TFLOPs", 0):
                    s["fp16_same_pipeline"] = entry
                continue
            if r["kind"] != "baseline" and m["TFLOPs"] > s.get("best", {}).get("TFLOPs", 0):
                s["best"] = {**entry, "config": r["config"]}
    return out


def cmd_collect(args) -> int:
    data = json.loads(Path(args.device_json).read_text())
    data["summary"] = summarize(data)
    RESULTS.mkdir(parents=True, exist_ok=True)
    dest = RESULTS / args.name
    dest.write_text(json.dumps(data, indent=1))
    print(f"wrote {dest}")
    bad = [r["name"] for r in data["gemm"] if not r.get("ok")]
    print("failed checks:", bad or "none")
    for key, s in data["summary"].items():
        parts = [f"{key:18s} cuBLAS {s['cublas_TFLOPs']:6.1f} TF"]
        for kind in ("baseline", "auto", "best", "fp16_same_pipeline"):
            if kind in s:
                parts.append(f"{kind} {s[kind]['TFLOPs']:6.1f} ({s[kind]['ratio_vs_cublas']:.2f}x)")
        print(" | ".join(parts))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", default=".gpu/G2/out")
    b.add_argument("--baseline-rev", default="HEAD", help="git revision of the baseline kernel ('' for none)")
    b.add_argument("--ops", action="store_true", help="also build the dlight small-op check")
    b.add_argument("--fp16", action="store_true", help="also build plain-fp16 GEMMs through the same pipeline")
    b.set_defaults(func=cmd_build)
    d = sub.add_parser("device")
    d.add_argument("--carry", default=".gpu/G2/out")
    d.add_argument("--out", required=True)
    d.set_defaults(func=cmd_device)
    c = sub.add_parser("collect")
    c.add_argument("device_json")
    c.add_argument("--name", default="gemm_sweep_h100_cpasync.json")
    c.set_defaults(func=cmd_collect)
    args = p.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
