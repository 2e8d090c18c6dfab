"""W4A16 kernel benchmark: builds here, checks and times on the GPU machine, CPU numbers here.

  python benchmarks/kernels.py build [--sweep | --sweep-small | --fused-only | --attention-only]
                                                 # CUDA libraries + plan -> .gpu/kernels/ (the carry folder)
  # on the GPU machine (run tool, carry .gpu/tvmrt and .gpu/kernels):
  #   python3 -m pip install -q --no-index --no-deps --target /tmp/tvmrt .gpu/tvmrt/*.whl &&
  #   PYTHONPATH=/tmp/tvmrt:.gpu/tvmrt python3 benchmarks/_device_kernels.py .gpu/kernels $OUT
  python benchmarks/kernels.py collect DEVICE_JSON  # -> benchmarks/results/kernels_h100.json + summary
  python benchmarks/kernels.py cpu                  # llvm GEMV vs numpy/torch FP32 here -> kernels_cpu.json
  python benchmarks/kernels.py cpu-gemm [--baseline-repo DIR]   # llvm prefill GEMM vs torch FP32 (and
                                                 # another checkout's kernel) -> gemm_cpu.json
  python benchmarks/kernels.py cpu-attention [--baseline-repo DIR]   # llvm prefill attention, the same way

The device script (no TVM compiler there: the runtime bundle from scripts/make_gpu_bundle.sh + torch)
checks every CUDA kernel against a float32 reference and times, in one run: our GEMV, cuBLAS FP16
(torch.matmul), torch's int4 tinygemm and a device-to-device copy, weights rotated through copies so
the L2 cache does not serve them. The sm_87 (Jetson Orin) kernels are built with compute_87 PTX
embedded and JIT-compiled by the H100's driver, so the exact Orin kernels are checked numerically.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
CARRY = REPO / ".gpu" / "kernels"

LLAMA7B = [("qkv", 12288, 4096), ("o", 4096, 4096), ("gate_up", 22016, 4096), ("down", 4096, 11008)]
SMOLLM2 = [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536)]
# ~1B models' long-K GEMVs with few rows, where the heuristic drops to one row per thread (--sweep-small)
SMALL_LONG_K = [("gemma3_1b_down", 1152, 6912), ("llama32_1b_down", 2048, 8192), ("llama32_1b_o", 2048, 2048),
                ("qwen05b_down", 896, 4864)]
ODD = [(100, 576, 64, 3), (960, 352, 32, 8), (77, 640, 128, 1), (130, 1536, 64, 5)]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "tvm_kernels", "benchmarks"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def _orin_on_x86():
    """The Orin's kernels (same DeviceTarget numbers: 16 SMs, sm_87) with an x86 host, so the H100 machine
    can load the library and JIT the embedded compute_87 PTX."""
    from tvm_kernels.targets import get_target

    orin = get_target("jetson-orin")
    return dataclasses.replace(
        orin, name="jetson-orin@x86-host", host_triple="x86_64-linux-gnu", cross_compiler=None,
        target={"kind": "cuda", "arch": "sm_87", "max_threads_per_block": 1024,
                "max_shared_memory_per_block": 49152, "thread_warp_size": 32},
    )


def _sweep_configs():
    """(M, config) tiling/math variants of the Llama-2-7B GEMVs, timed side by side (--sweep)."""
    from tvm_kernels.gemv_w4a16 import CudaConfig as C

    out = [(1, C(32, r, ty, u, ksplit=ks)) for r, ty, u, ks in
            ((2, 4, 4, 1), (4, 4, 2, 1), (2, 4, 2, 2), (2, 4, 4, 2), (1, 8, 4, 1), (2, 8, 4, 1), (4, 2, 4, 1),
             (2, 2, 4, 1), (2, 4, 2, 1), (2, 4, 1, 1), (2, 4, 1, 2), (2, 4, 1, 4), (1, 4, 4, 2), (2, 8, 2, 1))]
    for M in (4, 8):
        out += [(M, C(32, r, ty, u)) for r, ty, u in ((4, 4, 2), (8, 4, 2), (4, 2, 2), (8, 2, 1))]
    return out


def _small_sweep_configs(N: int, K: int, target):
    """Tilings of a short, long-K GEMV at M = 1: the heuristic first, then K split over 2 / 4 warps."""
    from tvm_kernels.gemv_w4a16 import CudaConfig as C, cuda_config

    base = cuda_config(N, K, 1, target)
    out = [base] + [C(32, r, ty, u, ksplit=ks) for r, ty, u, ks in
                    ((1, 4, 1, 2), (1, 4, 2, 2), (1, 4, 1, 4), (1, 2, 1, 4), (2, 2, 1, 4), (2, 4, 1, 2), (1, 8, 1, 2),
                     (2, 2, 1, 2))]
    seen, uniq = set(), []
    for c in out:
        key = (c.rows, c.ty, c.unroll, c.ksplit)
        if key not in seen:
            seen.add(key)
            uniq.append(c)
    return uniq


def cmd_build(args) -> int:
    from tvm_kernels.cuda_env import check_cubin, prepare_cuda_build, set_embed_ptx

    prepare_cuda_build()
    import tvm

    from tvm_kernels.gemv_w4a16 import cuda_config, gemv_w4a16
    from tvm_kernels.targets import get_target

    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    plan = {"commit": git_commit(), "built": datetime.datetime.utcnow().isoformat() + "Z",
            "build_host": platform.node(), "command": " ".join(sys.argv), "libs": {}, "kernels": []}

    def add(lib, name, f, **meta):
        libs.setdefault(lib, {})[name] = f.with_attr("global_symbol", name)
        plan["kernels"].append({"name": name, "lib": lib, **meta})

    libs: dict[str, dict] = {}
    sm90 = get_target("cuda-sm90")
    orin = _orin_on_x86()
    from tvm_kernels.decode_attention import decode_attention
    from tvm_kernels.fused_ops import add_rms_norm

    for tname, t, lib in (("cuda-sm90", sm90, "sm90"), ("jetson-orin", orin, "sm87")):
        # the decode step's other kernels, checked (not timed) on both builds: add+RMSNorm, split-KV attention
        for H in (4096, 576):
            add(lib, f"addnorm_{lib}_h{H}", add_rms_norm(H, 1e-5, t), kind="add_norm", set="fused", label=f"h{H}",
                N=H, K=H, G=0, M=7, target=tname)
        for label, (hq, hkv, d) in (("llama7b", (32, 32, 128)), ("smollm2", (9, 3, 64))):
            add(lib, f"attn_{lib}_{label}", decode_attention(hkv, hq, d, t), kind="decode_attn", set="fused",
                label=label, N=hq, K=hkv, G=d, M=1, target=tname)
        # more context slices than the merge's warp has lanes, and a head of 20 VEC-wide pieces (head_dim 80)
        add(lib, f"attn_{lib}_s40_d80", decode_attention(2, 4, 80, t, override={"splits": 40}), kind="decode_attn",
            set="fused", label="s40_d80", N=4, K=2, G=80, M=1, target=tname)
        # the sliding-window variant (Gemma3's local layers: the window starts inside its first page)
        for label, (hq, hkv, d) in (("gemma3_1b", (4, 1, 256)), ("smollm2", (9, 3, 64))):
            add(lib, f"wattn_{lib}_{label}", decode_attention(hkv, hq, d, t, sliding_window=True), kind="decode_attn",
                set="fused", label=f"{label}_window", N=hq, K=hkv, G=d, M=1, target=tname, sliding=True)
        # the decode GEMV with the gated MLP epilogue (export's gate_up): 7B and SmolLM2 shapes, gelu with K split
        for label, (N, K, G, act) in (("llama7b", (22016, 4096, 128, "silu")), ("smollm2", (3072, 576, 64, "silu")),
                                      ("gelu_ksplit", (512, 11008, 128, "gelu_tanh"))):
            add(lib, f"glu_{lib}_{label}", gemv_w4a16(N, K, G, t, M=1, glu=act), kind="gemv_glu", set="fused",
                label=label, N=N, K=K, G=G, M=1, target=tname, act=act)
        # the add + RMSNorm folded into the decode GEMVs around it (export's Layer.stream): the norm prologue
        # (qkv; gate_up with its gated epilogue) and the residual epilogue (o_proj; down with K split)
        for label, (N, K, G, act) in (("llama7b_qkv", (12288, 4096, 128, None)), ("llama7b_gate_up", (22016, 4096, 128, "silu")),
                                      ("smollm2_qkv", (960, 576, 64, None)), ("smollm2_gate_up", (3072, 576, 64, "silu"))):
            add(lib, f"norm_{lib}_{label}", gemv_w4a16(N, K, G, t, M=1, glu=act, norm_eps=1e-5), kind="gemv_norm",
                set="fused", label=label, N=N, K=K, G=G, M=1, target=tname, act=act)
        for label, (N, K, G) in (("llama7b_o", (4096, 4096, 128)), ("llama7b_down", (4096, 11008, 128)),
                                 ("smollm2_down", (576, 1536, 64))):
            add(lib, f"res_{lib}_{label}", gemv_w4a16(N, K, G, t, M=1, residual=True), kind="gemv_res",
                set="fused", label=label, N=N, K=K, G=G, M=1, target=tname)
        # the INT8 lm_head (export --lm-head int8): 7B, SmolLM2 and an odd shape, decode's M = 1 and chunks of x
        from tvm_kernels.gemv_w8a16 import gemv_w8a16

        for label, (N, K) in (("llama7b", (32000, 4096)), ("smollm2", (49152, 576)), ("odd", (37, 96))):
            add(lib, f"w8_{lib}_{label}", gemv_w8a16(N, K, 32, t), kind="gemv_w8", set="fused", label=label,
                N=N, K=K, G=32, M=1, Ms=[1, 3, 17], target=tname)
        if args.attention_only:
            # prefill attention: ours (both builds) and TVM's stock kernel (sm_90, the baseline it replaces)
            from tvm.relax.frontend.nn.llm.kv_cache import _attention_prefill_ragged

            from tvm_kernels.prefill_attention import prefill_attention

            from tvm_kernels.decode_attention import config as decode_config

            for label, (hq, hkv, d) in (("llama7b", (32, 32, 128)), ("smollm2", (9, 3, 64))):
                add(lib, f"pattn_{lib}_{label}", prefill_attention(hkv, hq, d, t), kind="prefill_attn", set="attn",
                    label=label, N=hq, K=hkv, G=d, M=0, target=tname, impl="awq-edge")
                if label == "llama7b":  # head_dim 256 (Gemma3) decode: the 8-wide vector path, checked
                    add(lib, f"attn_{lib}_d256", decode_attention(1, 4, 256, t), kind="decode_attn", set="attn",
                        label="d256", N=4, K=1, G=256, M=1, target=tname)
                if lib != "sm90":
                    continue
                # decode attention launch configurations: the current one first, then wider loads / more
                # token streams / other split counts
                base = decode_config(hq, hkv, d, t)
                variants = [{}]
                threads = base["bdx"] * base["bdy"]
                for bdz in (max(1, 128 // threads), max(1, 256 // threads), max(1, 512 // threads)):
                    for splits in (base["splits"] // 2, base["splits"], min(64, base["splits"] * 2)):
                        v = {"bdz": bdz, "splits": max(1, splits)}
                        if v != {x: base[x] for x in v} and v not in variants:
                            variants.append(v)
                # the heuristic before this sweep (256 threads, ~4 blocks per SM, up to 32 slices)
                prev = {"bdz": max(1, 256 // threads), "splits": max(1, min(32, -(-4 * t.num_sms // hkv)))}
                if prev not in variants and prev != {x: base[x] for x in prev}:
                    variants.append(prev)
                for j, v in enumerate(variants):
                    add(lib, f"dattn_{label}_v{j}", decode_attention(hkv, hq, d, t, override=v), kind="decode_attn",
                        set="dattn", label=label, N=hq, K=hkv, G=d, M=1, target=tname, config={**base, **v})
                if lib == "sm90":
                    with t.tvm_target() as tt:
                        stock = _attention_prefill_ragged(hkv, hq, d, d, "float16", {}, tt)
                    add(lib, f"pattn_stock_{label}", stock, kind="prefill_attn", set="attn", label=label,
                        N=hq, K=hkv, G=d, M=0, target=tname, impl="tvm-stock")
            continue
        if args.sweep_small:
            continue
        if args.fused_only:
            # and the prefill GEMM as export builds it (cp.async on): odd shapes and one 7B shape, checked
            from tvm_kernels.gemm_w4a16 import gemm_w4a16

            for i, (N, K, G, Ms) in enumerate([(100, 576, 64, 17), (960, 352, 32, 512), (4096, 4096, 128, 64)]):
                add(lib, f"gemm_{lib}_chk{i}", gemm_w4a16(N, K, G, t), kind="gemm", set="odd", label=f"chk{i}",
                    N=N, K=K, G=G, M=Ms, target=tname)
            continue
        for group, shapes, G in (("llama7b", LLAMA7B, 128), ("smollm2", SMOLLM2, 64)):
            for Ms in ((1, 4, 8) if lib == "sm90" else (1,)):
                for label, N, K in shapes:
                    cfg = cuda_config(N, K, Ms, t)
                    add(lib, f"gemv_{lib}_{group}_{label}_m{Ms}", gemv_w4a16(N, K, G, t, M=Ms),
                        kind="gemv", set=group, label=label, N=N, K=K, G=G, M=Ms, target=tname,
                        config=dataclasses.asdict(cfg))
        for i, (N, K, G, Ms) in enumerate(ODD):
            add(lib, f"gemv_{lib}_odd{i}", gemv_w4a16(N, K, G, t, M=Ms), kind="gemv", set="odd", label=f"odd{i}",
                N=N, K=K, G=G, M=Ms, target=tname, config=dataclasses.asdict(cuda_config(N, K, Ms, t)))
    if args.sweep:
        for label, N, K in LLAMA7B:
            for j, (Ms, cfg) in enumerate(_sweep_configs()):
                add("sm90sweep", f"gemv_sweep_{label}_m{Ms}_c{j}", gemv_w4a16(N, K, 128, sm90, M=Ms, config=cfg),
                    kind="gemv", set="sweep", label=label, N=N, K=K, G=128, M=Ms, target="cuda-sm90",
                    config=dataclasses.asdict(cfg))
    if args.sweep_small:
        for label, N, K in SMALL_LONG_K:
            for j, cfg in enumerate(_small_sweep_configs(N, K, sm90)):
                add("sm90small", f"gemv_small_{label}_c{j}", gemv_w4a16(N, K, 128, sm90, M=1, config=cfg),
                    kind="gemv", set="sweep", label=label, N=N, K=K, G=128, M=1, target="cuda-sm90",
                    config=dataclasses.asdict(cfg), heuristic=j == 0)
    gemm = None if args.fused_only or args.attention_only or args.sweep_small else _try_gemm()
    if gemm is not None:
        for label, N, K in LLAMA7B:
            add("gemm90", f"gemm_sm90_llama7b_{label}", gemm(N, K, 128, sm90), kind="gemm", set="llama7b",
                label=label, N=N, K=K, G=128, M=2048, target="cuda-sm90")
        for i, (N, K, G, Ms) in enumerate([(100, 576, 64, 17), (960, 352, 32, 512)]):
            add("gemm90", f"gemm_sm90_odd{i}", gemm(N, K, G, sm90), kind="gemm", set="odd", label=f"odd{i}",
                N=N, K=K, G=G, M=Ms, target="cuda-sm90")

    for lib, funcs in libs.items():
        t = orin if lib == "sm87" else sm90
        set_embed_ptx(lib == "sm87")
        t0 = time.time()
        try:
            from tvm_kernels.gemm_w4a16 import BUILD_CONFIG  # as export builds CUDA libraries

            with t.tvm_target() as target, tvm.transform.PassContext(opt_level=3, config=BUILD_CONFIG):
                built = tvm.compile(tvm.IRModule(funcs), target=target)
        except Exception as e:
            if lib != "gemm90":
                raise
            # H3b's GEMM is work in progress: report it, benchmark the rest
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
            print(f"GEMM build failed, not benchmarked: {msg}")
            plan["gemm_error"] = msg
            plan["kernels"] = [k for k in plan["kernels"] if k["lib"] != lib]
            continue
        path = tmp / f"{lib}.so"
        built.export_library(str(path))
        entries = check_cubin(path, t.arch, ptx=(lib == "sm87"))
        plan["libs"][lib] = {"file": path.name, "arch": t.arch, "fatbin": entries, "kernels": len(funcs),
                             "build_s": round(time.time() - t0, 1)}
        print(f"built {path.name}: {len(funcs)} kernels for {t.arch} in {time.time() - t0:.1f}s, fatbin {entries}")
    shutil.copy(REPO / "benchmarks" / "_device_kernels.py", tmp / "_device_kernels.py")
    (tmp / "plan.json").write_text(json.dumps(plan, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"carry folder {out} ({size / 1e6:.1f} MB), {len(plan['kernels'])} kernels")
    return 0


def _try_gemm():
    """H3b's prefill GEMM, when its file exists (it is benchmarked in the same device run)."""
    if not (REPO / "tvm_kernels" / "gemm_w4a16.py").is_file():
        print("tvm_kernels/gemm_w4a16.py not present: GEMM not included")
        return None
    from tvm_kernels import gemm_w4a16

    return gemm_w4a16.gemm_w4a16


def cmd_collect(args) -> int:
    data = json.loads(Path(args.device_json).read_text())
    data["collected"] = {"command": " ".join([sys.executable] + sys.argv), "commit_at_collect": git_commit()}
    _current_heuristic(data)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / args.name
    out.write_text(json.dumps(data, indent=1))
    print(f"wrote {out}")
    for line in data.get("summary_lines", []) + data.get("current_heuristic", {}).get("lines", []):
        print(line)
    return 0


def _current_heuristic(data) -> None:
    """Where today's cuda_config picks a tiling other than the one the run used as default, and the run
    timed that exact tiling in its sweep (same shape, same config -> the same generated kernel), report
    the Llama-2-7B layer with those rows. Labelled as derived: no separate timing."""
    from tvm_kernels.gemv_w4a16 import cuda_config
    from tvm_kernels.targets import get_target

    sweep = {(r["label"], r["M"], json.dumps(r["config"], sort_keys=True)): r for r in data.get("sweep", [])}
    lines, layers = [], []
    for M in (1, 4, 8):
        rows, changed = [], []
        for r in data.get("gemv", []):
            if r["target"] != "cuda-sm90" or r["set"] != "llama7b" or r["M"] != M:
                continue
            cfg = dataclasses.asdict(cuda_config(r["N"], r["K"], M, get_target("cuda-sm90")))
            if cfg == r["config"]:
                rows.append(r)
                continue
            alt = sweep.get((r["label"], M, json.dumps(cfg, sort_keys=True)))
            if alt is None:
                rows = []
                break
            rows.append(alt)
            changed.append(f"{r['label']}: {r['us']:.2f} -> {alt['us']:.2f} us")
        if len(rows) == 4 and changed:
            tb, tt = sum(r["bytes"] for r in rows), sum(r["us"] for r in rows)
            layer = {"M": M, "us": tt, "GBps": tb / tt / 1e3, "min_GBps": min(r["GBps"] for r in rows),
                     "per_gemv": {r["label"]: round(r["GBps"]) for r in rows}, "changed": changed,
                     "label": "DERIVED from the same run's sweep rows (identical kernels), not a separate timing"}
            layers.append(layer)
            lines.append(f"current heuristic, llama7b M={M} (derived from sweep rows of this run; {'; '.join(changed)}): "
                         f"{tt:.1f} us = {layer['GBps']:.0f} GB/s, min {layer['min_GBps']:.0f} {layer['per_gemv']}")
    if layers:
        data["current_heuristic"] = {"layers": layers, "lines": lines}


def cmd_cpu(args) -> int:
    if args.threads:
        # before numpy/torch/tvm start their thread pools
        for var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)
    import numpy as np
    import tvm

    from tvm_kernels.gemv_w4a16 import gemv_w4a16, reference
    from tvm_kernels.layout import dequantize_kernel_layout, random_quantized
    from tvm_kernels.targets import get_target

    try:
        import torch
    except ImportError:
        torch = None
    t = get_target(args.target)
    if torch is not None and args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    shapes = [("smollm2", lbl, N, K, 64) for lbl, N, K in SMOLLM2] + [("llama7b", "o", 4096, 4096, 128)]
    rng = np.random.default_rng(0)
    for group, label, N, K, G in shapes:
        w, s, z = random_quantized(N, K, G, rng)
        x = rng.standard_normal((1, K)).astype(np.float16)
        lib = tvm.compile(tvm.IRModule({"main": gemv_w4a16(N, K, G, t, M=1)}), target=t.tvm_target())
        y = np.full((1, N), np.nan, np.float16)
        a = [tvm.runtime.tensor(v) for v in (x, w, s, z, y)]
        lib["main"](*a)
        ref = reference(x, w, s, z, G)
        err = float(np.linalg.norm(a[4].numpy().astype(np.float32) - ref) / np.linalg.norm(ref))
        # min over repeats: this 2-core machine is shared, the fastest repeat is the least disturbed one
        sec = min(lib.mod.time_evaluator("main", tvm.cpu(), number=max(3, int(2e8 // (N * K))), repeat=7)(*a).results)
        nbytes = w.nbytes + s.nbytes + z.nbytes + x.nbytes + y.nbytes
        W32 = dequantize_kernel_layout(w, s, z, G)
        xf = x.astype(np.float32)
        sec_np = _time_py(lambda: xf @ W32.T)
        row = {"set": group, "label": label, "N": N, "K": K, "G": G, "rel_err": err, "tvm_us": sec * 1e6,
               "tvm_GBps": nbytes / sec / 1e9, "numpy_fp32_us": sec_np * 1e6,
               "numpy_fp32_GBps": (W32.nbytes + xf.nbytes) / sec_np / 1e9, "tvm_bytes": nbytes}
        if torch is not None:
            Wt, xt = torch.from_numpy(W32), torch.from_numpy(xf)
            sec_t = _time_py(lambda: torch.matmul(xt, Wt.T))
            row.update(torch_fp32_us=sec_t * 1e6, torch_fp32_GBps=(W32.nbytes + xf.nbytes) / sec_t / 1e9)
        row["speedup_vs_numpy"] = sec_np / sec
        rows.append(row)
        print(f"{group:8s} {label:8s} {N:6d}x{K:<6d} err {err:.1e}  llvm {sec*1e6:9.1f} us {row['tvm_GBps']:6.2f} GB/s | "
              f"numpy fp32 {sec_np*1e6:9.1f} us {row['numpy_fp32_GBps']:6.2f} GB/s"
              + (f" | torch fp32 {row['torch_fp32_us']:9.1f} us {row['torch_fp32_GBps']:6.2f} GB/s" if torch else ""))
    res = {"device": f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores): {_cpu_name()}",
           "target": t.name, "commit": git_commit(), "command": " ".join([sys.executable] + sys.argv),
           "date": datetime.datetime.utcnow().isoformat() + "Z", "torch_threads": torch.get_num_threads() if torch else None,
           "load_average_1_5_15": list(os.getloadavg()),  # other jobs on this machine make CPU numbers noisy
           "threads": args.threads or "all", "timing": "min over 7 repeats (shared machine)", "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"kernels_cpu_{args.threads}thread.json" if args.threads else "kernels_cpu.json"
    (RESULTS / name).write_text(json.dumps(res, indent=1))
    print(f"wrote {RESULTS / name}")
    return 0


# Times one checkout's CPU GEMM (tvm_kernels.gemm_w4a16 for llvm) in a subprocess, so that two checkouts'
# kernels run side by side in one benchmark: argv = repo, target, threads, JSON list of (label, N, K, G, M).
_GEMM_TIMER = """
import json, os, sys
os.environ["TVM_NUM_THREADS"] = sys.argv[3]
sys.path.insert(0, sys.argv[1])
import numpy as np, tvm
from tvm_kernels.gemm_w4a16 import gemm_w4a16, reference
from tvm_kernels.layout import random_quantized
from tvm_kernels.targets import get_target
t, out = get_target(sys.argv[2]), []
# argv[5], if any: a tiling [block_n, rows] (this checkout's CpuConfig) instead of the default
config = None
if len(sys.argv) > 5 and sys.argv[5]:
    from tvm_kernels.gemm_w4a16 import CpuConfig
    config = CpuConfig(*json.loads(sys.argv[5]))
for label, N, K, G, M in json.loads(sys.argv[4]):
    rng = np.random.default_rng(N + K + M)
    w, s, z = random_quantized(N, K, G, rng)
    x = rng.standard_normal((M, K)).astype(np.float16)
    with t.tvm_target() as target:
        lib = tvm.compile(tvm.IRModule({"main": gemm_w4a16(N, K, G, t, config=config)}), target=target)
    a = [tvm.runtime.tensor(v) for v in (x, w, s, z, np.full((M, N), np.nan, np.float16))]
    lib["main"](*a)
    ref = reference(x, w, s, z, G)
    err = float(np.linalg.norm(a[4].numpy().astype(np.float32) - ref) / np.linalg.norm(ref))
    # each repeat >= 50 ms: sub-millisecond calls on this shared 2-core machine scatter by 2x otherwise
    est = lib.mod.time_evaluator("main", tvm.cpu(), number=2, repeat=1)(*a).mean
    sec = min(lib.mod.time_evaluator("main", tvm.cpu(), number=max(3, int(0.05 / est)), repeat=7)(*a).results)
    out.append({"label": label, "N": N, "K": K, "G": G, "M": M, "sec": sec, "rel_err": err})
print(json.dumps(out))
"""


_ATTENTION_TIMER = """
import json, os, sys
os.environ["TVM_NUM_THREADS"] = sys.argv[3]
sys.path.insert(0, sys.argv[1])
import numpy as np, tvm
from export.cpu_schedule import prefill_attention_cpu
from tvm_kernels.decode_attention import reference
from tvm_kernels.targets import get_target
t, out = get_target(sys.argv[2]), []
H, HK, D = 9, 3, 64  # SmolLM2's heads
with t.tvm_target() as target:
    lib = tvm.compile(tvm.IRModule({"main": prefill_attention_cpu(H, HK, D)}), target=target)
for L in json.loads(sys.argv[4]):
    rng = np.random.default_rng(L)
    q, k, v = (rng.standard_normal((L, h, D)).astype(np.float16) for h in (H, HK, HK))
    a = [tvm.runtime.tensor(x) for x in (q, np.array([0, L], np.int32), k, v, np.array([0, L], np.int32),
         np.zeros(L, np.int32), np.zeros(1, np.int32), np.zeros((L, H, D), np.float16), np.zeros((L, H), np.float32))]
    f = lib["main"]
    f(*a, 1, 0, 1.0, 1e4, D ** -0.5)
    i = L - 1  # the last row sees every key
    ref, _ = reference(q[i], k, v, D ** -0.5)
    err = float(np.abs(a[7].numpy()[i].astype(np.float32) - ref).max())
    sec = min(lib.mod.time_evaluator("main", tvm.cpu(), number=max(1, 2000 // L), repeat=5)(*a, 1, 0, 1.0, 1e4, D ** -0.5).results)
    out.append({"tokens": L, "sec": sec, "max_abs_err_last_row": err})
print(json.dumps(out))
"""


def _checkouts(args) -> dict[str, tuple[str, str]]:
    """name -> (checkout, the timer's extra argument): ours, and --baseline-repo's as "baseline"."""
    repos = {"ours": (str(REPO), "")}
    if args.baseline_repo:
        base = Path(args.baseline_repo).resolve()
        if not (base / "tvm_kernels").is_dir():
            raise SystemExit(f"--baseline-repo {args.baseline_repo}: not a checkout of this project (no tvm_kernels/)")
        repos["baseline"] = (str(base), "")
    return repos


def _tiling(text: str) -> str:
    """--configs BNxROWS, e.g. 16x6."""
    parts = text.split("x")
    if len(parts) != 2 or not all(v.isdigit() and int(v) > 0 for v in parts):
        raise argparse.ArgumentTypeError(f"expected BLOCK_NxROWS such as 16x6, got {text!r}")
    return text


def _time_checkouts(timer: str, repos: dict, args, payload, key, check, best: dict) -> None:
    """One round: `timer` (a script: repo, target, threads, JSON payload[, extra] -> JSON rows) for each entry
    of `repos` in turn; `best[name][key(row)]` keeps each row's fastest. `check(row)`: an error message, or None."""
    for name, (repo, extra) in repos.items():
        proc = subprocess.run([sys.executable, "-c", timer, repo, args.target, str(args.threads), json.dumps(payload),
                               extra], capture_output=True, text=True, check=True)
        for row in json.loads(proc.stdout.strip().splitlines()[-1]):
            if (msg := check(row)) is not None:
                raise SystemExit(f"{name} {key(row)}: {msg}")
            prev = best.setdefault(name, {}).get(key(row))
            best[name][key(row)] = row if prev is None or row["sec"] < prev["sec"] else prev


def _write_cpu_ab(args, repos: dict, timing: str, **fields) -> int:
    baseline = None
    if "baseline" in repos:
        baseline = subprocess.run(["git", "-C", repos["baseline"][0], "rev-parse", "HEAD"], capture_output=True,
                                  text=True).stdout.strip() or None
    res = {"device": f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores): {_cpu_name()}",
           "target": args.target, "threads": args.threads, "commit": git_commit(), "baseline_commit": baseline,
           "command": " ".join([sys.executable] + sys.argv), "date": datetime.datetime.utcnow().isoformat() + "Z",
           "load_average_1_5_15": list(os.getloadavg()), "timing": timing, **fields}
    out = RESULTS / args.json
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")
    return 0


def cmd_cpu_attention(args) -> int:
    """The llvm causal prefill attention (export.cpu_schedule.prefill_attention_cpu, SmolLM2's heads) on
    one chunk: this checkout's against another's (--baseline-repo), alternating rounds, best round each."""
    repos, best = _checkouts(args), {}
    for _ in range(args.rounds):
        _time_checkouts(_ATTENTION_TIMER, repos, args, args.tokens, lambda r: r["tokens"],
                        lambda r: f"error {r['max_abs_err_last_row']:.1e}" if r["max_abs_err_last_row"] > 2e-3 else None,
                        best)
    rows = []
    for L in args.tokens:
        flops = 4 * L * L / 2 * 64 * 9  # q k^T and p v over the causal half
        row = {"tokens": L, **{f"{n}_ms": best[n][L]["sec"] * 1e3 for n in best},
               **{f"{n}_GFLOPs": flops / best[n][L]["sec"] / 1e9 for n in best}}
        if "baseline" in best:
            row["speedup"] = row["baseline_ms"] / row["ours_ms"]
        rows.append(row)
        print(" | ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    return _write_cpu_ab(args, repos, f"best of {args.rounds} alternating rounds, each the min of 5 repeats", rows=rows)


def cmd_cpu_gemm(args) -> int:
    """The llvm prefill GEMM (tvm_kernels.gemm_w4a16) on SmolLM2's four shapes: this checkout's against
    torch FP32 (x @ W^T on the dequantized weight) and, with --baseline-repo, another checkout's kernel,
    alternating rounds in one run (best round each)."""
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import numpy as np
    import torch

    from tvm_kernels.layout import dequantize_kernel_layout, random_quantized

    torch.set_num_threads(args.threads)
    jobs = [(lbl, N, K, 64, M) for M in args.m for lbl, N, K in SMOLLM2]
    repos, best = _checkouts(args), {}
    for c in args.configs:  # tilings of this checkout's kernel, as "ours_<block_n>x<rows>"
        bn, rows = (int(v) for v in c.split("x"))
        repos[f"ours_{c}"] = (str(REPO), json.dumps([bn, rows]))
    for _ in range(args.rounds):
        _time_checkouts(_GEMM_TIMER, repos, args, jobs, lambda r: (r["label"], r["M"]),
                        lambda r: f"relative error {r['rel_err']:.1e} against the numpy reference" if r["rel_err"] > 2e-3 else None,
                        best)
        for lbl, N, K, G, M in jobs:
            rng = np.random.default_rng(N + K + M)
            w, s, z = random_quantized(N, K, G, rng)
            xt = torch.from_numpy(rng.standard_normal((M, K)).astype(np.float32))
            Wt = torch.from_numpy(dequantize_kernel_layout(w, s, z, G))
            sec = _time_py(lambda: torch.matmul(xt, Wt.T))
            prev = best.setdefault("torch_fp32", {}).get((lbl, M))
            if prev is None or sec < prev["sec"]:
                best["torch_fp32"][(lbl, M)] = {"label": lbl, "N": N, "K": K, "G": G, "M": M, "sec": sec}
    rows = []
    for lbl, N, K, G, M in jobs:
        row = {"label": lbl, "N": N, "K": K, "G": G, "M": M}
        for name in best:
            sec = best[name][(lbl, M)]["sec"]
            row[f"{name}_ms"] = sec * 1e3
            row[f"{name}_GFLOPs"] = 2 * M * N * K / sec / 1e9
        for name in best:
            if name != "ours":
                row[f"speedup_vs_{name}"] = row[f"{name}_ms"] / row["ours_ms"]
        rows.append(row)
        print(f"{lbl:8s} M={M:5d} " + " | ".join(f"{n} {row[f'{n}_ms']:8.2f} ms {row[f'{n}_GFLOPs']:6.1f} GFLOP/s" for n in best))
    per_layer = {name: {M: sum(r[f"{name}_ms"] for r in rows if r["M"] == M) for M in args.m} for name in best}
    print("a layer's four GEMMs (ms):", json.dumps(per_layer))
    return _write_cpu_ab(args, repos, f"best of {args.rounds} alternating rounds, each the min of 7 repeats of >= 50 ms",
                         rows=rows, layer_ms=per_layer)


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _time_py(fn, min_time=0.3):
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.05:
        fn()
        n += 1
    reps = max(1, int(n * min_time / 0.05 / 5))
    samples = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        samples.append((time.perf_counter() - t0) / reps)
    return min(samples)  # as for the TVM kernel: the least disturbed repeat on a shared machine


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", default=str(CARRY))
    b.add_argument("--sweep", action="store_true", help="also build tiling variants of the Llama-2-7B GEMVs")
    b.add_argument("--fused-only", action="store_true", help="only the add+RMSNorm and decode-attention kernels")
    b.add_argument("--sweep-small", action="store_true",
                   help="only tilings of ~1B models' long-K GEMVs (SMALL_LONG_K) and the fused-kernel checks")
    b.add_argument("--attention-only", action="store_true", help="only the prefill attention kernels (ours, TVM's)")
    b.set_defaults(func=cmd_build)
    c = sub.add_parser("collect")
    c.add_argument("device_json")
    c.add_argument("--name", default="kernels_h100.json")
    c.set_defaults(func=cmd_collect)
    cp = sub.add_parser("cpu")
    cp.add_argument("--target", default="cpu")
    cp.add_argument("--threads", type=int, default=0, help="pin TVM/numpy/torch to this many threads (0: all cores)")
    cp.set_defaults(func=cmd_cpu)
    cg = sub.add_parser("cpu-gemm")
    cg.add_argument("--target", default="cpu")
    cg.add_argument("--threads", type=int, default=2)
    cg.add_argument("-m", type=int, nargs="+", default=[128, 512], help="rows of x (prompt tokens of a chunk)")
    cg.add_argument("--baseline-repo", default=None, help="another checkout whose kernel runs in the same rounds")
    cg.add_argument("--configs", nargs="*", default=[], metavar="BNxROWS", type=_tiling,
                    help="also this checkout's kernel with these tilings (CpuConfig block_n x rows), e.g. 16x4 32x3")
    cg.add_argument("--rounds", type=int, default=3)
    cg.add_argument("--json", default="gemm_cpu.json")
    cg.set_defaults(func=cmd_cpu_gemm)
    ca = sub.add_parser("cpu-attention")
    ca.add_argument("--target", default="cpu")
    ca.add_argument("--threads", type=int, default=2)
    ca.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    ca.add_argument("--baseline-repo", default=None, help="another checkout whose kernel runs in the same rounds")
    ca.add_argument("--rounds", type=int, default=3)
    ca.add_argument("--json", default="attention_cpu.json")
    ca.set_defaults(func=cmd_cpu_attention)
    args = p.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
