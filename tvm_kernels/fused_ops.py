"""Fused residual add + RMSNorm: (y, s) = (rms_norm(a + b) * w, a + b), one kernel, any row count M.

Why it exists (measured, benchmarks/results/gemm_sweep_h100.json "ops"): in a decoder layer the
residual sum feeds both the next norm and the next residual, so Relax fuses add + rms_norm into one
function with two outputs, which no dlight rule matches; the generic fallback took 11-63 us per call
on the H100 (torch: 3.6-5.4 us), twice per layer. dlight's SiLU*mul and rotary (inside the KV cache)
measured fine, so only this op is hand written.

CUDA: one thread block per row. A thread owns `chunks` vectors of `vec` halves of the row (coalesced
16-byte loads when vec = 8), keeps the sum in registers, accumulates its share of sum(s^2) in fp32,
the block reduces the shares (TVM's cross-thread allreduce: warp shuffles), and the same thread
writes both outputs from its registers: a and b are read once, y and s written once.
`b` may be absent (the first layer's input norm): then s is not written and the kernel is rms_norm.

Numerics follow the relax rms_norm the model used before (fp16 sum as in HF, fp32 statistics,
y = fp16(s * rsqrt(mean(s^2) + eps) * w) in fp32).

CPU (llvm): the same computation in TE, rows in parallel.
"""
from __future__ import annotations

import numpy as np

from tvm_kernels.errors import UserError
from tvm_kernels.targets import DeviceTarget, get_target


def reference(a: np.ndarray, b: np.ndarray | None, w: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """numpy: (y, s) as float32, with s rounded to fp16 first as the kernel does."""
    s = np.asarray(a, np.float16) if b is None else (np.asarray(a, np.float16) + np.asarray(b, np.float16))
    s32 = s.astype(np.float32)
    r = 1.0 / np.sqrt(np.mean(s32 * s32, axis=-1, keepdims=True) + np.float32(eps))
    return s32 * r * np.asarray(w, np.float32), s32


def thread_config(hidden: int, max_threads: int) -> tuple[int, int, int]:
    """(threads, chunks, vec) with threads * chunks * vec == hidden: the widest vector that divides
    the row, then as few chunks per thread as keep the block within max_threads."""
    vec = next(v for v in (8, 4, 2, 1) if hidden % v == 0)
    n = hidden // vec
    chunks = next(c for c in range(1, n + 1) if n % c == 0 and n // c <= max_threads)
    return n // chunks, chunks, vec


def add_rms_norm(hidden: int, eps: float, target: "str | DeviceTarget", residual: bool = True):
    """PrimFunc(a f16[M, H], [b f16[M, H],] w f16[H], y f16[M, H][, s f16[M, H]]) for the target,
    M symbolic (int64). Without `residual` it is plain rms_norm(a) * w."""
    if hidden <= 0:
        raise UserError(f"add_rms_norm: hidden size must be positive, got {hidden}")
    dt = get_target(target)
    f = _cuda(hidden, float(eps), dt, residual) if dt.is_cuda else _llvm(hidden, float(eps), residual)
    return f.with_attr("tirx.is_scheduled", True)


def _cuda(H: int, eps: float, dt: DeviceTarget, residual: bool):
    from tvm.script import tirx as T

    TX, NC, V = thread_config(H, min(dt.max_threads_per_block, 1024))
    inv_h = T.float32(1.0 / H)
    eps_ = T.float32(eps)
    unroll = {"pragma_auto_unroll_max_step": 256, "pragma_unroll_explicit": 1}

    def loc(h):  # the thread-local slot of row element h
        return (h // T.int64(V * TX)) * T.int64(V) + h % T.int64(V)

    def elem(c, tx, v):
        return (c * T.int64(TX) + tx) * T.int64(V) + v

    # The two kernels differ only in how a thread fills its slice of the row (a + b, storing the sum,
    # or a alone); these macros are the rest, expanded in place.
    @T.macro
    def squares(tx, row, part, s_loc):  # inside the first threadIdx loop: this thread's share of sum(s^2)
        with T.sblock("part_init"):
            t, m = T.axis.remap("SS", [tx, row])
            part[t, m] = T.float32(0)
        for i in range(T.int64(NC * V)):
            with T.sblock("part"):
                t, m, k = T.axis.remap("SSR", [tx, row, i])
                part[t, m] = part[t, m] + T.Cast("float32", s_loc[k]) * T.Cast("float32", s_loc[k])

    @T.macro
    def normalize(row, M, part, total, s_loc, y_loc, w, y):  # block-wide sum (cross-thread allreduce), then y from the registers
        for tx in T.thread_binding(T.int64(TX), thread="threadIdx.x"):
            with T.sblock("total"):
                t, m = T.axis.remap("RS", [tx, row])
                with T.init():
                    total[m] = T.float32(0)
                total[m] = total[m] + part[t, m]
        for tx in T.thread_binding(T.int64(TX), thread="threadIdx.x"):
            for c in range(T.int64(NC)):
                # fp32 math unrolled, then one vector store (TVM's 8-wide fp32 vectors don't compile)
                for v in T.unroll(T.int64(V)):
                    with T.sblock("norm"):
                        m = T.axis.spatial(M, row)
                        h = T.axis.spatial(T.int64(H), elem(c, tx, v))
                        y_loc[loc(h)] = T.Cast("float16", T.rsqrt(total[m] * inv_h + eps_)
                                               * T.Cast("float32", s_loc[loc(h)]) * T.Cast("float32", w[h]))
                for v in T.vectorized(T.int64(V)):
                    with T.sblock("store_norm"):
                        m = T.axis.spatial(M, row)
                        h = T.axis.spatial(T.int64(H), elem(c, tx, v))
                        y[m, h] = y_loc[loc(h)]

    @T.prim_func(private=True, s_tir=True)
    def add_norm(pa: T.handle, pb: T.handle, w: T.Buffer((T.int64(H),), "float16"), py: T.handle, ps: T.handle):
        T.func_attr({"tirx.noalias": True})
        M = T.int64()
        a = T.match_buffer(pa, (M, T.int64(H)), "float16")
        b = T.match_buffer(pb, (M, T.int64(H)), "float16")
        y = T.match_buffer(py, (M, T.int64(H)), "float16")
        s = T.match_buffer(ps, (M, T.int64(H)), "float16")
        with T.sblock("root"):
            # block-level buffers: lowering places each at the loops that use it (per thread / per block)
            s_loc = T.sblock_alloc_buffer((T.int64(NC * V),), "float16", scope="local")
            y_loc = T.sblock_alloc_buffer((T.int64(NC * V),), "float16", scope="local")
            part = T.sblock_alloc_buffer((T.int64(TX), M), "float32", scope="local")
            total = T.sblock_alloc_buffer((M,), "float32", scope="shared")
            for row in T.thread_binding(M, thread="blockIdx.x"):
                for tx in T.thread_binding(T.int64(TX), thread="threadIdx.x", annotations=unroll):
                    for c in range(T.int64(NC)):
                        for v in T.vectorized(T.int64(V)):
                            with T.sblock("sum"):
                                m = T.axis.spatial(M, row)
                                h = T.axis.spatial(T.int64(H), elem(c, tx, v))
                                s_loc[loc(h)] = a[m, h] + b[m, h]
                        for v in T.vectorized(T.int64(V)):
                            with T.sblock("store_sum"):
                                m = T.axis.spatial(M, row)
                                h = T.axis.spatial(T.int64(H), elem(c, tx, v))
                                s[m, h] = s_loc[loc(h)]
                    squares(tx, row, part, s_loc)
                normalize(row, M, part, total, s_loc, y_loc, w, y)

    @T.prim_func(private=True, s_tir=True)
    def norm(pa: T.handle, w: T.Buffer((T.int64(H),), "float16"), py: T.handle):
        T.func_attr({"tirx.noalias": True})
        M = T.int64()
        a = T.match_buffer(pa, (M, T.int64(H)), "float16")
        y = T.match_buffer(py, (M, T.int64(H)), "float16")
        with T.sblock("root"):
            s_loc = T.sblock_alloc_buffer((T.int64(NC * V),), "float16", scope="local")
            y_loc = T.sblock_alloc_buffer((T.int64(NC * V),), "float16", scope="local")
            part = T.sblock_alloc_buffer((T.int64(TX), M), "float32", scope="local")
            total = T.sblock_alloc_buffer((M,), "float32", scope="shared")
            for row in T.thread_binding(M, thread="blockIdx.x"):
                for tx in T.thread_binding(T.int64(TX), thread="threadIdx.x", annotations=unroll):
                    for c in range(T.int64(NC)):
                        for v in T.vectorized(T.int64(V)):
                            with T.sblock("load"):
                                m = T.axis.spatial(M, row)
                                h = T.axis.spatial(T.int64(H), elem(c, tx, v))
                                s_loc[loc(h)] = a[m, h]
                    squares(tx, row, part, s_loc)
                normalize(row, M, part, total, s_loc, y_loc, w, y)

    return add_norm if residual else norm


def _llvm(H: int, eps: float, residual: bool):
    from tvm import s_tir, te, tirx

    M = tirx.Var("M", "int64")
    Hc = tirx.IntImm("int64", H)
    a = te.placeholder((M, Hc), "float16", name="a")
    b = te.placeholder((M, Hc), "float16", name="b") if residual else None
    w = te.placeholder((Hc,), "float16", name="w")
    s = te.compute((M, Hc), lambda m, h: a[m, h] + b[m, h], name="sum") if residual else a
    k = te.reduce_axis((tirx.IntImm("int64", 0), Hc), name="k")
    sq = te.compute((M,), lambda m: te.sum(s[m, k].astype("float32") * s[m, k].astype("float32"), axis=k), name="sq")
    y = te.compute((M, Hc), lambda m, h: (tirx.rsqrt(sq[m] / tirx.const(H, "float32") + tirx.const(eps, "float32"))
                                          * s[m, h].astype("float32") * w[h].astype("float32")).astype("float16"),
                   name="norm")
    args = [a, b, w, y, s] if residual else [a, w, y]
    sch = s_tir.Schedule(te.create_prim_func(args).with_attr("tirx.noalias", True))
    m_loop = sch.get_loops(sch.get_sblock("norm"))[0]
    sch.compute_at(sch.get_sblock("sq"), m_loop)
    sch.parallel(m_loop)
    if residual:
        sch.parallel(sch.get_loops(sch.get_sblock("sum"))[0])
    return sch.mod["main"]
