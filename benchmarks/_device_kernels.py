"""Device side of benchmarks/kernels.py: runs on the GPU machine with torch + the TVM runtime bundle only.

usage: PYTHONPATH=/tmp/tvmrt:.gpu/tvmrt python3 _device_kernels.py CARRY_DIR OUT_DIR
Checks every kernel in CARRY_DIR/plan.json against a float32 torch reference (fresh random inputs,
output poisoned with NaN first), then times ours / cuBLAS FP16 / torch int4 tinygemm / copy with CUDA
graphs over weight copies rotated so that the L2 cache never holds them. Writes OUT_DIR/kernels_device.json.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

import tvmrt

tvm_ffi = tvmrt.load(cuda=True)

DEV = "cuda"
L2_BUST_BYTES = 256 << 20  # rotate through at least this many weight bytes (H100 L2: 50 MB)
MAX_COPIES = 512
TOL = 2e-3  # relative L2 error: fp32 accumulation, fp16 output (~3e-4 expected)


def log(*a):
    print(*a, flush=True)


def rand_kernel_tensors(N, K, G, gen):
    w = torch.randint(-(2**31), 2**31 - 1, (N, K // 8), dtype=torch.int32, device=DEV, generator=gen)
    s = (torch.rand((N, K // G), device=DEV, generator=gen) * 0.02 + 0.001).half()
    z = torch.randint(0, 16, (N, K // G), device=DEV, generator=gen).half()
    return w, s, z


def dequant(w, s, z, G):
    """float32 W [N, K] from the kernel layout (torch on the GPU)."""
    N = w.shape[0]
    shifts = torch.arange(0, 32, 4, device=DEV, dtype=torch.int32)
    q = ((w.unsqueeze(-1) >> shifts) & 15).reshape(N, -1).float()
    return (q - z.float().repeat_interleave(G, 1)) * s.float().repeat_interleave(G, 1)


def as_u32(w):
    return w.view(torch.uint32)


def ffi(t):
    return tvm_ffi.from_dlpack(t)


def weight_copies(N, K, G, n, gen):
    """n independent random W4 matrices as the kernels take them: (weight u32, scales, zeros) FFI tensors."""
    return [tuple(ffi(a) for a in (as_u32(w), s, z)) for w, s, z in (rand_kernel_tensors(N, K, G, gen) for _ in range(n))]


GRAPH_OK = [True]


def time_graph(launches, reps_min=100, replays=15):
    """time_graph_ or, if CUDA graph capture of TVM launches fails here, a plain event-timed loop."""
    if GRAPH_OK[0]:
        try:
            return time_graph_(launches, reps_min, replays)
        except Exception as e:
            GRAPH_OK[0] = False
            log(f"CUDA graph capture failed ({type(e).__name__}: {str(e)[:200]}); timing plain launches from now on")
            torch.cuda.synchronize()
    return time_loop(launches, reps_min, replays)


def time_loop(launches, reps_min=100, replays=15):
    n = len(launches)
    reps = int(math.ceil(max(reps_min, n) / n) * n)
    for f in launches:
        f()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for i in range(reps):
            launches[i % n]()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / reps)
    return statistics.median(times), (max(times) - min(times)) / statistics.median(times)


def time_graph_(launches, reps_min=100, replays=15):
    """Median seconds per launch. `launches` is a list of zero-arg callables (one per weight copy),
    captured round-robin into one CUDA graph so launch overhead and Python stay out of the timing."""
    n = len(launches)
    reps = max(reps_min, n)
    reps = int(math.ceil(reps / n) * n)
    for f in launches:
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for f in launches[: min(n, 3)]:
            f()
    stream.synchronize()
    with tvm_ffi.use_torch_stream(torch.cuda.graph(g, stream=stream)):
        for i in range(reps):
            launches[i % n]()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / reps)
    return statistics.median(times), (max(times) - min(times)) / statistics.median(times)


def copies_for(nbytes):
    return int(min(MAX_COPIES, max(2, math.ceil(L2_BUST_BYTES / max(nbytes, 1)))))


def check_gemv(fn, k, gen):
    N, K, G, M = k["N"], k["K"], k["G"], k["M"]
    w, s, z = rand_kernel_tensors(N, K, G, gen)
    x = torch.randn((M, K), device=DEV, generator=gen).half()
    y = torch.full((M, N), float("nan"), device=DEV, dtype=torch.float16)
    fn(ffi(x), ffi(as_u32(w)), ffi(s), ffi(z), ffi(y))
    torch.cuda.synchronize()
    ref = x.float() @ dequant(w, s, z, G).T
    finite = bool(torch.isfinite(y).all())
    err = float((y.float() - ref).norm() / ref.norm()) if finite else float("nan")
    return {"rel_err": err, "all_written": finite, "ok": finite and err < TOL}


def check_gemv_variant(fn, k, gen):
    """The decode GEMV with its neighbours inside (kinds gemv_glu / gemv_norm / gemv_res) against torch float32:
    gemv_norm: x is the residual stream, normalized with gamma (rounded to fp16, as the norm kernel writes it);
    `act`: rows interleave gate and up, y [M, N/2] = act(gate) * up; gemv_res: y = fp16(x @ W^T) + r (the add
    in fp16, as the unfused model did)."""
    N, K, G, M = k["N"], k["K"], k["G"], k["M"]
    norm, res, act = k["kind"] == "gemv_norm", k["kind"] == "gemv_res", k.get("act")
    w, s, z = rand_kernel_tensors(N, K, G, gen)
    x = (torch.randn((M, K), device=DEV, generator=gen) * (4 if norm else 1)).half()
    args, h = [ffi(x), ffi(as_u32(w)), ffi(s), ffi(z)], x.float()
    if norm:
        gamma = (1 + 0.3 * torch.randn((K,), device=DEV, generator=gen)).half()
        args.append(ffi(gamma))
        h = (h * torch.rsqrt((h * h).mean(-1, keepdim=True) + 1e-5) * gamma.float()).half().float()
    ref = h @ dequant(w, s, z, G).T
    if act:
        gate, up = ref[:, 0::2], ref[:, 1::2]
        ref = (torch.nn.functional.silu(gate) if act == "silu" else torch.nn.functional.gelu(gate, approximate="tanh")) * up
    if res:
        r = (torch.randn((M, N), device=DEV, generator=gen) * 8).half()
        args.append(ffi(r))
        ref = (ref.half() + r).float()
    y = torch.full((M, N // 2 if act else N), float("nan"), device=DEV, dtype=torch.float16)
    fn(*args, ffi(y))
    torch.cuda.synchronize()
    finite = bool(torch.isfinite(y).all())
    err = float((y.float() - ref).norm() / ref.norm()) if finite else float("nan")
    return {"rel_err": err, "all_written": finite, "ok": finite and err < TOL}


def check_add_norm(fn, k, gen):
    """add+RMSNorm against torch float32 (sum rounded to fp16 first, as the model computes it)."""
    H, M = k["N"], k["M"]
    a = (torch.randn((M, H), device=DEV, generator=gen) * 3).half()
    b = torch.randn((M, H), device=DEV, generator=gen).half()
    w = (1 + 0.3 * torch.randn((H,), device=DEV, generator=gen)).half()
    y = torch.full((M, H), float("nan"), device=DEV, dtype=torch.float16)
    s = torch.full((M, H), float("nan"), device=DEV, dtype=torch.float16)
    fn(ffi(a), ffi(b), ffi(w), ffi(y), ffi(s))
    torch.cuda.synchronize()
    s_ref = (a + b).float()
    ref = s_ref * torch.rsqrt((s_ref * s_ref).mean(-1, keepdim=True) + 1e-5) * w.float()
    finite = bool(torch.isfinite(y).all() and torch.isfinite(s).all())
    err = float((y.float() - ref).norm() / ref.norm()) if finite else float("nan")
    ok = finite and err < TOL and bool(torch.equal(s.float(), s_ref))
    return {"rel_err": err, "all_written": finite, "ok": ok}


def check_decode_attn(fn, k, gen):
    """Split-KV paged decode attention for one sequence (pages out of order, a partial last page) against
    torch float32 softmax attention; lse in log2 units. Two context lengths: short and long. With
    k["sliding"], the layout the cache hands a sliding-window layer: the window's pages, the window starting
    `offset` tokens into the first (the tokens before it are NaN, so reading one shows), length_info [3, 1]."""
    Hq, Hkv, D, P = k["N"], k["K"], k["G"], 16
    worst, finite = 0.0, True
    for L, offset in ((37, 5), (700, 11)) if k.get("sliding") else ((37, 0), (700, 0)):
        n = -(-(offset + L) // P)
        pages = torch.full((n + 3, 2, Hkv, P, D), float("nan"), device=DEV, dtype=torch.float16)
        order = torch.randperm(n + 3, device=DEV, generator=gen)[:n].int()
        kk = torch.randn((L, Hkv, D), device=DEV, generator=gen).half()
        vv = torch.randn((L, Hkv, D), device=DEV, generator=gen).half()
        t = torch.arange(L, device=DEV) + offset
        pages[order[t // P].long(), 0, :, t % P] = kk
        pages[order[t // P].long(), 1, :, t % P] = vv
        q = (torch.randn((1, Hq, D), device=DEV, generator=gen) * 2).half()
        out = torch.full((1, Hq, D), float("nan"), device=DEV, dtype=torch.float16)
        lse = torch.full((1, Hq), float("nan"), device=DEV, dtype=torch.float32)
        i32 = lambda v: torch.tensor(v, device=DEV, dtype=torch.int32)  # noqa: E731
        scale = D ** -0.5
        last = offset + L - (n - 1) * P
        info = i32([[last], [offset], [0]]) if k.get("sliding") else i32([last])
        fn(ffi(q), ffi(pages), ffi(i32([0, n])), ffi(order.contiguous()), ffi(info), ffi(i32([0])),
           ffi(i32([0])), ffi(out), ffi(lse), 0, 1.0, 1e4, scale)
        torch.cuda.synchronize()
        g = Hq // Hkv
        kf, vf = kk.float().repeat_interleave(g, 1), vv.float().repeat_interleave(g, 1)  # [L, Hq, D]
        sc = torch.einsum("hd,lhd->hl", q[0].float(), kf) * scale
        ref = torch.einsum("hl,lhd->hd", torch.softmax(sc, -1), vf)
        ref_lse = torch.logsumexp(sc, -1) / math.log(2)
        finite = finite and bool(torch.isfinite(out).all() and torch.isfinite(lse).all())
        if finite:
            worst = max(worst, float((out[0].float() - ref).norm() / ref.norm()),
                        float((lse[0] - ref_lse).abs().max() / ref_lse.abs().max()))
    err = worst if finite else float("nan")
    return {"rel_err": err, "all_written": finite, "ok": finite and err < TOL}


def _prefill_ref(q, k, v, scale, causal):
    """torch float32: q [Lq, Hq, D], k/v [Lk, Hkv, D] (queries = the last Lq positions) -> out, lse (log2)."""
    Lq, Hq, _ = q.shape
    Lk, Hkv, _ = k.shape
    g = Hq // Hkv
    s = torch.einsum("qhd,khd->hqk", q.float(), k.float().repeat_interleave(g, 1)) * scale
    if causal:
        vis = torch.arange(Lk, device=DEV)[None, :] < (Lk - Lq + torch.arange(Lq, device=DEV) + 1)[:, None]
        s = s.masked_fill(~vis[None], float("-inf"))
    out = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v.float().repeat_interleave(g, 1))
    return out, (torch.logsumexp(s, -1) / math.log(2)).T


def _prefill_call(fn, seqs, Hq, Hkv, D, gen, causal):
    """One ragged batch: seqs = [(qo_len, kv_len)]; output/lse poisoned with NaN first."""
    qs = [(torch.randn((a, Hq, D), device=DEV, generator=gen) * 2).half() for a, _ in seqs]
    ks = [torch.randn((b, Hkv, D), device=DEV, generator=gen).half() for _, b in seqs]
    vs = [torch.randn((b, Hkv, D), device=DEV, generator=gen).half() for _, b in seqs]
    i32 = lambda v: torch.tensor(v, device=DEV, dtype=torch.int32)  # noqa: E731
    q_indptr = i32([0] + list(np.cumsum([a for a, _ in seqs])))
    kv_indptr = i32([0] + list(np.cumsum([b for _, b in seqs])))
    q, k, v = torch.cat(qs), torch.cat(ks), torch.cat(vs)
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"), device=DEV, dtype=torch.float32)
    scale = D ** -0.5
    args = [ffi(q), ffi(q_indptr), ffi(k), ffi(v), ffi(kv_indptr), ffi(torch.zeros(len(q), device=DEV, dtype=torch.int32)),
            ffi(torch.zeros(len(seqs), device=DEV, dtype=torch.int32)), ffi(out), ffi(lse)]
    fn(*args, int(causal), 0, 1.0, 1e4, scale)
    torch.cuda.synchronize()
    return qs, ks, vs, out, lse, scale, q_indptr.tolist()


def check_prefill_attn(fn, k, gen):
    """Ragged prefill attention: three sequences in one call (one continues a cached prefix: queries are the
    last 20 of 90 keys), causal and not, against torch float32 softmax attention; lse in log2 units."""
    Hq, Hkv, D = k["N"], k["K"], k["G"]
    worst, finite = 0.0, True
    for causal in (1, 0):
        qs, ks, vs, out, lse, scale, ind = _prefill_call(fn, [(37, 37), (300, 300), (20, 90)], Hq, Hkv, D, gen, causal)
        finite = finite and bool(torch.isfinite(out).all() and torch.isfinite(lse).all())
        for i, (q, kk, vv) in enumerate(zip(qs, ks, vs)):
            ref, ref_lse = _prefill_ref(q, kk, vv, scale, causal)
            o, l = out[ind[i]:ind[i + 1]].float(), lse[ind[i]:ind[i + 1]]
            if finite:
                worst = max(worst, float((o - ref).norm() / ref.norm()),
                            float((l - ref_lse).abs().max() / ref_lse.abs().max()))
    err = worst if finite else float("nan")
    return {"rel_err": err, "all_written": finite, "ok": finite and err < TOL}


def bench_decode_attn(fn, k, gen):
    """One sequence decoding at contexts of 640 and 2300 tokens (prompt + generated), pages out of order."""
    Hq, Hkv, D, P = k["N"], k["K"], k["G"], 16
    rows = []
    for L in (640, 2300):
        n = -(-L // P)
        pages = torch.randn((n + 3, 2, Hkv, P, D), device=DEV, generator=gen).half()
        order = torch.randperm(n + 3, device=DEV, generator=gen)[:n].int().contiguous()
        q = torch.randn((1, Hq, D), device=DEV, generator=gen).half()
        out = torch.empty((1, Hq, D), device=DEV, dtype=torch.float16)
        lse = torch.empty((1, Hq), device=DEV, dtype=torch.float32)
        i32 = lambda v: torch.tensor(v, device=DEV, dtype=torch.int32)  # noqa: E731
        args = [ffi(q), ffi(pages), ffi(i32([0, n])), ffi(order), ffi(i32([L - (n - 1) * P])), ffi(i32([0])),
                ffi(i32([0])), ffi(out), ffi(lse)]
        sec, spread = time_graph([lambda: fn(*args, 0, 1.0, 1e4, D ** -0.5)], reps_min=50)
        kv_bytes = 2 * L * Hkv * D * 2
        rows.append({"L": L, "us": sec * 1e6, "GBps": kv_bytes / sec / 1e9, "spread": spread})
    return {"lengths": rows}


def bench_prefill_attn(fn, k, gen):
    """One causal sequence of L tokens (no cached prefix), L = 512 and 2048; torch SDPA (flash) beside it."""
    Hq, Hkv, D = k["N"], k["K"], k["G"]
    rows = []
    for L in (512, 2048):
        q = torch.randn((L, Hq, D), device=DEV, generator=gen).half()
        kk = torch.randn((L, Hkv, D), device=DEV, generator=gen).half()
        vv = torch.randn((L, Hkv, D), device=DEV, generator=gen).half()
        out = torch.empty_like(q)
        lse = torch.empty((L, Hq), device=DEV, dtype=torch.float32)
        i32 = lambda v: torch.tensor(v, device=DEV, dtype=torch.int32)  # noqa: E731
        z = torch.zeros(L, device=DEV, dtype=torch.int32)
        args = [ffi(q), ffi(i32([0, L])), ffi(kk), ffi(vv), ffi(i32([0, L])), ffi(z), ffi(z[:1]), ffi(out), ffi(lse)]
        sec, spread = time_graph([lambda: fn(*args, 1, 0, 1.0, 1e4, D ** -0.5)], reps_min=20)
        qt, kt, vt = (x.transpose(0, 1).unsqueeze(0) for x in (q, kk, vv))
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)  # noqa: E731
        sec_t, _ = time_graph([sdpa], reps_min=20)
        flops = 4 * D * Hq * L * (L + 1) / 2  # causal: QK^T and PV over the visible half
        rows.append({"L": L, "us": sec * 1e6, "TFLOPs": flops / sec / 1e12, "spread": spread,
                     "torch_sdpa_us": sec_t * 1e6, "ratio_vs_sdpa": sec_t / sec})
    return {"lengths": rows}


def check_gemv_w8(fn, k, gen):
    """The INT8 lm_head GEMV (tvm_kernels/gemv_w8a16): symmetric int8 [N, K] with fp16 scales per G columns,
    float32 logits, against torch float32 for each M in k["Ms"] (one kernel: M is symbolic)."""
    N, K, G = k["N"], k["K"], k["G"]
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=DEV, generator=gen)
    s = (torch.rand((N, K // G), device=DEV, generator=gen) * 0.01 + 1e-4).half()
    W = q.float() * s.float().repeat_interleave(G, 1)
    worst, finite = 0.0, True
    for M in k["Ms"]:
        x = (torch.randn((M, K), device=DEV, generator=gen) * 3).half()
        y = torch.full((M, N), float("nan"), device=DEV, dtype=torch.float32)
        fn(ffi(x), ffi(q), ffi(s), ffi(y))
        torch.cuda.synchronize()
        ref = x.float() @ W.T
        finite = finite and bool(torch.isfinite(y).all())
        worst = max(worst, float((y - ref).norm() / ref.norm()) if finite else float("nan"))
    out = {"rel_err": worst, "all_written": finite, "ok": finite and worst < 1e-4}
    if k["label"] != "odd":  # M = 1 timed cold against cuBLAS with the FP16 matrix (what the FP16 lm_head reads)
        copies = copies_for(N * K)
        Q = [ffi(torch.randint(-127, 128, (N, K), dtype=torch.int8, device=DEV, generator=gen)) for _ in range(copies)]
        x, y = torch.randn((1, K), device=DEV, generator=gen).half(), torch.empty((1, N), device=DEV)
        X, S, Y = ffi(x), ffi(s), ffi(y)
        out["us"] = time_graph([(lambda q_=q_: fn(X, q_, S, Y)) for q_ in Q])[0] * 1e6
        del Q
        H = [torch.randn((N, K), device=DEV, generator=gen).half() for _ in range(copies_for(2 * N * K))]
        out["cublas_fp16_us"] = time_graph([(lambda h=h: torch.matmul(x, h.T)) for h in H])[0] * 1e6
        del H
        log(f"gemv_w8 {k['label']}: {out['us']:.2f} us against cuBLAS FP16 {out['cublas_fp16_us']:.2f} us")
    return out


CHECKS = {"gemv_glu": check_gemv_variant, "gemv_norm": check_gemv_variant, "gemv_res": check_gemv_variant, "add_norm": check_add_norm, "decode_attn": check_decode_attn, "prefill_attn": check_prefill_attn,
          "gemv_w8": check_gemv_w8}


def check_gemm(fn, k, gen):
    N, K, G = k["N"], k["K"], k["G"]
    M = k["M"] if k["set"] == "odd" else 2048
    return check_gemv(fn, {**k, "M": M}, gen)


def bench_gemv(fn, k, gen, with_baselines):
    N, K, G, M = k["N"], k["K"], k["G"], k["M"]
    w, s, z = rand_kernel_tensors(N, K, G, gen)
    nbytes = w.numel() * 4 + s.numel() * 2 + z.numel() * 2 + M * K * 2 + M * N * 2
    nc = copies_for(nbytes)
    xs = [torch.randn((M, K), device=DEV, generator=gen).half() for _ in range(min(nc, 8))]
    ys = torch.empty((M, N), device=DEV, dtype=torch.float16)
    ws = [(ffi(as_u32(w.clone())), ffi(s.clone()), ffi(z.clone())) for _ in range(nc)]
    fx = [ffi(x) for x in xs]
    fy = ffi(ys)
    launches = [(lambda i=i: fn(fx[i % len(fx)], *ws[i], fy)) for i in range(nc)]
    sec, spread = time_graph(launches)
    row = {"us": sec * 1e6, "GBps": nbytes / sec / 1e9, "bytes": nbytes, "copies": nc, "spread": spread}
    del ws, launches
    if with_baselines:
        row.update(bench_cublas(N, K, M, gen))
        row.update(bench_tinygemm(N, K, G, M, gen))
    torch.cuda.empty_cache()
    return row


def bench_cublas(N, K, M, gen):
    W = (torch.randn((N, K), device=DEV, generator=gen) * 0.02).half()
    nbytes = W.numel() * 2 + M * K * 2 + M * N * 2
    nc = copies_for(nbytes)
    Ws = [W.clone() for _ in range(nc)]
    x = torch.randn((M, K), device=DEV, generator=gen).half()
    out = torch.empty((M, N), device=DEV, dtype=torch.float16)
    sec, spread = time_graph([(lambda i=i: torch.matmul(x, Ws[i].T, out=out)) for i in range(nc)])
    del Ws
    return {"cublas_us": sec * 1e6, "cublas_GBps": nbytes / sec / 1e9, "cublas_bytes": nbytes}


def bench_tinygemm(N, K, G, M, gen):
    try:
        q = torch.randint(0, 16, (N, K), dtype=torch.int32, device=DEV, generator=gen)
        packed_u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
        inner = next(t for t in (8, 4, 2) if K % (t * 16) == 0)  # its kernel's K-tile constraint
        packed = torch._convert_weight_to_int4pack(packed_u8, inner)
        sz = (torch.rand((K // G, N, 2), device=DEV, generator=gen) * 0.02).to(torch.bfloat16)
        x = torch.randn((M, K), device=DEV, generator=gen).to(torch.bfloat16)
        nbytes = N * K // 2 + sz.numel() * 2 + M * K * 2 + M * N * 2
        nc = copies_for(nbytes)
        ps = [packed.clone() for _ in range(nc)]
        szs = [sz.clone() for _ in range(nc)]
        sec, _ = time_graph([(lambda i=i: torch._weight_int4pack_mm(x, ps[i], G, szs[i])) for i in range(nc)])
        del ps, szs
        return {"tinygemm_us": sec * 1e6, "tinygemm_GBps": nbytes / sec / 1e9, "tinygemm_bytes": nbytes}
    except Exception as e:  # report, do not hide: the row says why tinygemm is missing
        return {"tinygemm_error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}


def bench_gemm(fn, k, gen):
    N, K, G, M = k["N"], k["K"], k["G"], 2048
    w, s, z = rand_kernel_tensors(N, K, G, gen)
    x = torch.randn((M, K), device=DEV, generator=gen).half()
    y = torch.empty((M, N), device=DEV, dtype=torch.float16)
    args = [ffi(x), ffi(as_u32(w)), ffi(s), ffi(z), ffi(y)]
    sec, spread = time_graph([lambda: fn(*args)], reps_min=20)
    W = dequant(w, s, z, G).half()
    out = torch.empty((M, N), device=DEV, dtype=torch.float16)
    sec_cb, _ = time_graph([lambda: torch.matmul(x, W.T, out=out)], reps_min=20)
    flops = 2 * M * N * K
    return {"M": M, "us": sec * 1e6, "TFLOPs": flops / sec / 1e12, "cublas_us": sec_cb * 1e6,
            "cublas_TFLOPs": flops / sec_cb / 1e12, "ratio_vs_cublas": sec_cb / sec, "spread": spread}


def bench_copy():
    """Device-to-device copy ceiling: the best of a few sizes/dtypes (bytes read + bytes written)."""
    best = None
    for n_bytes, dtype in ((1 << 30, torch.float32), (1 << 28, torch.float32), (1 << 30, torch.uint8)):
        src = torch.rand(n_bytes // torch.tensor([], dtype=dtype).element_size(), device=DEV).to(dtype)
        dst = torch.empty_like(src)
        sec, _ = time_graph([lambda: dst.copy_(src)], reps_min=10, replays=10)
        row = {"bytes_moved": 2 * n_bytes, "dtype": str(dtype), "us": sec * 1e6, "GBps": 2 * n_bytes / sec / 1e9}
        log(f"copy {n_bytes >> 20} MiB {dtype}: {row['GBps']:.0f} GB/s")
        if best is None or row["GBps"] > best["GBps"]:
            best = row
        del src, dst
    return best


def main():
    carry, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    plan = json.loads((carry / "plan.json").read_text())
    only = set(os.environ.get("KERNELS_ONLY", "").split(",")) - {""}
    props = torch.cuda.get_device_properties(0)
    res = {"device": f"{props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB), "
                     f"torch {torch.__version__}", "commit": plan["commit"], "plan_command": plan["command"],
           "device_command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "libs": plan["libs"], "checks": [], "gemv": [], "gemm": [], "sweep": []}
    log(res["device"])
    mods = {}
    for lib, info in plan["libs"].items():
        t0 = time.time()
        mods[lib] = tvm_ffi.load_module(str(carry / info["file"]))
        log(f"loaded {info['file']} in {time.time() - t0:.2f}s")
    res["copy"] = bench_copy()
    res["timing"] = "cuda-graph" if GRAPH_OK[0] else "plain-launch-loop"
    log(f"copy: {res['copy']['GBps']:.0f} GB/s")
    gen = torch.Generator(device=DEV)
    gen.manual_seed(1234)
    for k in plan["kernels"]:
        if only and k["set"] not in only:
            continue
        try:
            fn = mods[k["lib"]][k["name"]]
            check = CHECKS.get(k["kind"]) or (check_gemm if k["kind"] == "gemm" else check_gemv)
            chk = check(fn, k, gen)
            # a second draw: a race or unwritten output shows up as a moving error
            chk2 = check(fn, k, gen)
            chk["rel_err2"], chk["ok"] = chk2["rel_err"], chk["ok"] and chk2["ok"]
        except Exception as e:
            chk = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            traceback.print_exc()
        res["checks"].append({"name": k["name"], **{x: k[x] for x in ("target", "set", "N", "K", "G", "M")}, **chk})
        log(f"check {k['name']:40s} {'OK ' if chk['ok'] else 'BAD'} {chk.get('rel_err', chk.get('error'))}")
        if not chk["ok"]:
            continue
        try:
            if k["set"] == "dattn":
                r = bench_decode_attn(fn, k, gen)
                res.setdefault("decode_attn", []).append({**k, **r})
                log(f"decode attn {k['name']:20s} {k['config']} " + " ".join(
                    f"L={row['L']}: {row['us']:6.2f} us {row['GBps']:5.0f} GB/s" for row in r["lengths"]))
            elif k["kind"] == "prefill_attn":
                r = bench_prefill_attn(fn, k, gen)
                res.setdefault("prefill_attn", []).append({**k, **r})
                for row in r["lengths"]:
                    log(f"prefill attn {k['name']:28s} L={row['L']:5d} {row['us']:9.1f} us {row['TFLOPs']:6.1f} TFLOP/s "
                        f"| torch SDPA {row['torch_sdpa_us']:8.1f} us")
            elif k["kind"] == "gemm":
                if k["set"] == "llama7b":
                    r = bench_gemm(fn, k, gen)
                    res["gemm"].append({**k, **r})
                    log(f"gemm {k['label']:8s} M=2048 {r['us']:8.1f} us {r['TFLOPs']:6.1f} TFLOP/s cuBLAS {r['cublas_TFLOPs']:6.1f} ({r['ratio_vs_cublas']:.2f}x)")
            elif k["set"] in ("llama7b", "smollm2"):
                r = bench_gemv(fn, k, gen, with_baselines=True)
                res["gemv"].append({**k, **r})
                log(f"gemv {k['name']:36s} {r['us']:8.2f} us {r['GBps']:7.0f} GB/s | cuBLAS {r['cublas_us']:8.2f} us | "
                    f"tinygemm {r.get('tinygemm_us', float('nan')):8.2f} us")
            elif k["set"] == "sweep":
                r = bench_gemv(fn, k, gen, with_baselines=False)
                res["sweep"].append({**k, **r})
                log(f"sweep {k['label']:8s} M={k['M']} {k['config']} {r['us']:8.2f} us {r['GBps']:7.0f} GB/s err {chk['rel_err']:.1e}")
        except Exception as e:
            traceback.print_exc()
            res.setdefault("errors", []).append(f"{k['name']}: {type(e).__name__}: {str(e)[:300]}")
        (out / "kernels_device.json").write_text(json.dumps(res, indent=1))
    res["timing"] = "cuda-graph" if GRAPH_OK[0] else "plain-launch-loop (graph capture failed)"
    summarize(res)
    (out / "kernels_device.json").write_text(json.dumps(res, indent=1))


def summarize(res):
    lines = []
    copy = res["copy"]["GBps"]
    lines.append(f"device: {res['device']}; copy bandwidth {copy:.0f} GB/s (read+write)")
    bad = [c["name"] for c in res["checks"] if not c["ok"]]
    lines.append(f"checks: {len(res['checks']) - len(bad)}/{len(res['checks'])} kernels match the reference"
                 + (f"; FAILED: {bad}" if bad else ""))
    layers = {}
    for r in res["gemv"]:
        key = (r["target"], r["set"], r["M"])
        layers.setdefault(key, []).append(r)
    res["layers"] = []
    for (target, group, M), rows in sorted(layers.items()):
        tb, tt = sum(r["bytes"] for r in rows), sum(r["us"] for r in rows)
        cb = sum(r["cublas_us"] for r in rows)
        tg = sum(r.get("tinygemm_us", float("nan")) for r in rows)
        layer = {"target": target, "set": group, "M": M, "us": tt, "GBps": tb / tt / 1e3, "cublas_us": cb,
                 "tinygemm_us": tg, "speedup_vs_cublas": cb / tt, "speedup_vs_tinygemm": tg / tt,
                 "min_GBps": min(r["GBps"] for r in rows), "copy_efficiency": tb / tt / 1e3 / copy,
                 "per_gemv": {r["label"]: round(r["GBps"]) for r in rows}}
        if group == "llama7b" and M == 1:
            # projection only: assumes the Orin reaches the same fraction of its 204.8 GB/s
            eff = layer["copy_efficiency"]
            layer["orin_projection"] = {"label": "PROJECTION (not measured): H100 bandwidth efficiency x 204.8 GB/s",
                                        "GBps": eff * 204.8, "layer_us": tb / (eff * 204.8e3)}
        res["layers"].append(layer)
        lines.append(f"[{target}] {group} M={M}: four GEMVs {tt:7.1f} us = {layer['GBps']:6.0f} GB/s "
                     f"(min {layer['min_GBps']:.0f}, {layer['per_gemv']}), cuBLAS FP16 {cb:7.1f} us "
                     f"({layer['speedup_vs_cublas']:.2f}x), tinygemm {tg:7.1f} us ({layer['speedup_vs_tinygemm']:.2f}x)")
        if "orin_projection" in layer:
            p = layer["orin_projection"]
            lines.append(f"    Orin PROJECTION (not measured): {p['GBps']:.0f} GB/s -> {p['layer_us']:.0f} us per 7B layer")
    if res["sweep"]:
        best = {}
        for r in res["sweep"]:
            key = (r["label"], r["M"])
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
        for (lbl, M), r in sorted(best.items()):
            lines.append(f"sweep best {lbl} M={M}: {r['config']} {r['us']:.2f} us {r['GBps']:.0f} GB/s")
    for r in res["gemm"]:
        lines.append(f"gemm {r['label']} M=2048: {r['TFLOPs']:.1f} TFLOP/s vs cuBLAS {r['cublas_TFLOPs']:.1f} ({r['ratio_vs_cublas']:.2f})")
    stock = {(r["label"], row["L"]): row["us"] for r in res.get("prefill_attn", []) if r.get("impl") == "tvm-stock"
             for row in r["lengths"]}
    for r in res.get("prefill_attn", []):
        if r.get("impl") == "tvm-stock":
            continue
        for row in r["lengths"]:
            base = stock.get((r["label"], row["L"]))
            vs = f", TVM's ragged kernel {base:.1f} us ({base / row['us']:.1f}x)" if base else ""
            where = r["target"] + (" build, PTX JIT on this GPU" if r["target"].startswith("jetson") else "")
            lines.append(f"[{where}] prefill attention {r['label']} L={row['L']}: {row['us']:.1f} us "
                         f"({row['TFLOPs']:.1f} TFLOP/s){vs}, torch SDPA {row['torch_sdpa_us']:.1f} us")
    res["summary_lines"] = lines
    log("\n".join(lines))


if __name__ == "__main__":
    main()
