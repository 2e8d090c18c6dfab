"""Weight-only INT8 GEMV for the lm_head: y[M, N] = x[M, K] @ dequant(W)^T, float32 logits out.

Layout (one copy serves the lm_head and, for tied models, the embedding lookup):
  weight int8    [N, K]     symmetric: W[n, k] = q[n, k] * s[n, k // G], q in [-127, 127]
  scales float16 [N, K / G] s = max|W[n, group]| / 127, rounded to fp16 before q is computed
Activations stay FP16 (weight-only, not W8A8); products are accumulated in float32.

Why: at decode a small model's lm_head is a large share of the bytes read per token (SmolLM2-135M:
49152 x 576 FP16 = 57 MB of ~117 MB). INT8 halves it (llama.cpp's Q4 GGUFs keep this matrix in Q8_0,
blocks of 32). The error of a group is at most s / 2 per weight, ~0.2% of the group's largest weight.

CPU (llvm) schedule, counted in vector instructions per 8 weights: one 8-byte load sign-extended to 8
int32 (vpmovsxbd), one int->float convert, one FMA against the activations (converted to float32 once
per call); R rows per step share each activation load; the scale is applied once per group (G / VL
steps) per row; two partial sums per row keep 2R independent FMA chains in flight. Tasks of NT rows
run in parallel; within a task the rows stay in L1 while every activation row m passes over them, so
M > 1 (prefill_logits, evaluation) does not re-read the weights from memory per row of x.

CUDA schedule: lanes along K (16-byte chunks, consecutive lanes consecutive chunks: coalesced), R rows per
thread sharing each activation load, a warp-shuffle reduction. A byte becomes a float with no int->float
convert (quarter rate on Hopper): XOR 0x80 makes it the unsigned q + 128, one byte-permute puts it under
the exponent bits of 2^23 (0x4B0000bb), one FADD subtracts 2^23 + 128, exactly; then one FFMA: three
full-rate instructions per weight, all in float32 (fp16 products of 127 * x could overflow). At batch 1
the kernel reads twice the bytes of a W4 GEMV with the same instruction count, so it stays memory-bound.
The grid's fastest axis is the activation row m, so M > 1 (prefill_logits, evaluation only) re-reads
each weight tile from L2, not HBM. H100 (benchmarks/results/lm_head_int8_gpu_ab_h100.json): the 7B's head
(32000 x 4096) 48.8 us, 2.85 TB/s, against 98.1 us for cuBLAS on the FP16 matrix.
"""
from __future__ import annotations

import numpy as np

from tvm_kernels.errors import UserError
from tvm_kernels.gemv_w4a16 import fewest_idle
from tvm_kernels.targets import get_target

GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 32  # as llama.cpp's Q8_0 blocks; see the report in export/lm_head.py
QMAX = 127


def quantize(w: np.ndarray, group_size: int = DEFAULT_GROUP_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """float W [N, K] -> (q int8 [N, K], scales float16 [N, K/G]), symmetric per row and group."""
    w = np.asarray(w, dtype=np.float32)
    _check(w.shape[0] if w.ndim == 2 else 0, w.shape[-1] if w.ndim == 2 else 0, group_size, "quantize")
    N, K = w.shape
    g = w.reshape(N, K // group_size, group_size)
    s = (np.abs(g).max(-1) / QMAX).astype(np.float16)
    s32 = s.astype(np.float32)[..., None]
    # an all-zero group (or one whose scale underflows fp16) quantizes to zeros
    q = np.where(s32 > 0, np.round(g / np.where(s32 > 0, s32, 1)), 0)
    return np.clip(q, -QMAX, QMAX).astype(np.int8).reshape(N, K), s


def dequantize(weight: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    """(q int8 [N, K], scales float16 [N, K/G]) -> float32 W [N, K]."""
    return weight.astype(np.float32) * np.repeat(scales.astype(np.float32), group_size, axis=1)


def reference(x: np.ndarray, weight: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    """numpy float32 y[M, N] = x @ dequant(W)^T."""
    return np.asarray(x, dtype=np.float32) @ dequantize(weight, scales, group_size).T


def _check(N: int, K: int, group_size: int, what: str) -> None:
    if group_size not in GROUP_SIZES:
        raise UserError(f"{what}: INT8 group size must be one of {GROUP_SIZES}, got {group_size}")
    if N <= 0 or K <= 0 or K % group_size:
        raise UserError(f"gemv_w8a16: K={K} must be a positive multiple of the group size {group_size} (N={N})")


def _cpu_kernel(N: int, K: int, G: int, M: int | None, R: int = 4, NT: int = 16, PD: int = 4):
    from tvm.script import tirx as T

    VL = 8  # float32 lanes: one AVX2 register, two NEON registers
    NG, CH = K // G, G // VL
    NTASK = -(-N // NT)

    def row(t, rb, r):  # rows past N (odd N) are clamped for loading and skipped at the store
        return T.min(t * NT + rb * R + r, N - 1)

    @T.prim_func(s_tir=True)
    def gemv(
        var_x: T.handle,
        weight: T.Buffer((N, K), "int8", align=8),  # numpy-backed arrays: no stronger alignment assumed
        scales: T.Buffer((N, NG), "float16"),
        var_y: T.handle,
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        m = T.int64()
        x = T.match_buffer(var_x, (m, K), "float16")
        y = T.match_buffer(var_y, (m, N), "float32")
        xf = T.alloc_buffer((m, K), "float32")
        for i in T.serial(m):
            for k in T.vectorized(K):
                with T.sblock("xf"):
                    vi, vk = T.axis.remap("SS", [i, k])
                    xf[vi, vk] = T.Cast("float32", x[vi, vk])
        for t in T.parallel(NTASK):
            with T.sblock("rows"):
                vt = T.axis.spatial(NTASK, t)
                T.reads(xf[0:m, 0:K], weight[0:N, 0:K], scales[0:N, 0:NG])
                T.writes(y[0:m, 0:N])
                # default scope: small constant-size buffers become stack allocas kept in registers
                acc = T.sblock_alloc_buffer((R, VL), "float32")
                part = T.sblock_alloc_buffer((R, 2, VL), "float32")
                red = T.sblock_alloc_buffer((1,), "float32")
                for i in T.serial(m):
                    for rb in T.serial(NT // R):
                        for r in T.unroll(R):
                            for v in T.vectorized(VL):
                                acc[r, v] = T.float32(0)
                        for g in T.serial(NG):
                            if PD > 0:
                                for r, line in T.grid(R, (G + 63) // 64):
                                    T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(
                                        weight[row(vt, rb + PD, r), g * G + line * 64]), T.int32(0), T.int32(3), T.int32(1)))
                            for r in T.unroll(R):
                                for a in T.unroll(2):
                                    for v in T.vectorized(VL):
                                        part[r, a, v] = T.float32(0)
                            for c in T.unroll(CH):
                                for r in T.unroll(R):
                                    for v in T.vectorized(VL):
                                        part[r, c % 2, v] = part[r, c % 2, v] + xf[i, g * G + c * VL + v] * T.Cast(
                                            "float32", T.Cast("int32", weight[row(vt, rb, r), g * G + c * VL + v]))
                            for r in T.unroll(R):
                                for v in T.vectorized(VL):
                                    acc[r, v] = acc[r, v] + (part[r, 0, v] + part[r, 1, v]) * T.Cast(
                                        "float32", scales[row(vt, rb, r), g])
                        for r in T.unroll(R):
                            red[0] = T.float32(0)
                            for v in T.serial(VL):
                                red[0] = red[0] + acc[r, v]
                            if vt * NT + rb * R + r < N:
                                y[i, vt * NT + rb * R + r] = red[0]

    return gemv


_I8_DOT4_SOURCE = r"""
__device__ __forceinline__ float awq_i8_dot4(unsigned w, float x0, float x1, float x2, float x3, float acc) {
  const unsigned u = w ^ 0x80808080u;
  acc = fmaf(__uint_as_float(__byte_perm(u, 0x4B000000u, 0x7540u)) - 8388736.0f, x0, acc);
  acc = fmaf(__uint_as_float(__byte_perm(u, 0x4B000000u, 0x7541u)) - 8388736.0f, x1, acc);
  acc = fmaf(__uint_as_float(__byte_perm(u, 0x4B000000u, 0x7542u)) - 8388736.0f, x2, acc);
  acc = fmaf(__uint_as_float(__byte_perm(u, 0x4B000000u, 0x7543u)) - 8388736.0f, x3, acc);
  return acc;
}
"""


def cuda_config(K: int) -> tuple[int, int, int]:
    """(lanes along K, rows per thread, 16-byte chunks per lane per step): the lane count that wastes the fewest
    predicated-off chunks (SmolLM2's K = 576 is 36 chunks: 4 lanes), then the largest unroll doing the same
    (SmolLM2 takes 16.6 us on the H100 with 1 or 3 chunks per step alike)."""
    ch = K // 16
    tx = fewest_idle(ch, (32, 16, 8, 4))
    iters = -(-ch // tx)
    return tx, 4, min(fewest_idle(iters, (4, 2, 1)), iters)


def _cuda_kernel(N: int, K: int, G: int):
    from tvm.script import tirx as T

    TX, R, U = cuda_config(K)
    TY = 128 // TX
    CH, CPG = K // 16, G // 16
    ITERS = -(-CH // TX)
    OUTER = -(-ITERS // U)
    K_TAIL = OUTER * U * TX != CH
    NB = -(-N // (TY * R))
    if NB > 65535:  # gridDim.y's limit
        raise UserError(f"gemv_w8a16: N={N} rows need {NB} blocks of {TY * R} rows, more than CUDA's 65535")
    NG = K // G
    NSHUF = TX.bit_length() - 1

    def chunk(o, u, tx):
        return (o * U + u) * TX + tx

    def row(by, ty, r):
        return (by * TY + ty) * R + r

    @T.prim_func(s_tir=True)
    def gemv(var_x: T.handle, weight: T.Buffer((N, K), "int8"), scales: T.Buffer((N, NG), "float16"), var_y: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        m = T.int64()
        x = T.match_buffer(var_x, (m, K), "float16")
        y = T.match_buffer(var_y, (m, N), "float32")
        wu = T.decl_buffer((N, K // 4), "uint32", data=weight.data)
        for bx in T.thread_binding(m, thread="blockIdx.x"):  # fastest: the rows of x share a weight tile in L2
            for by in T.thread_binding(NB, thread="blockIdx.y"):
                for ty in T.thread_binding(TY, thread="threadIdx.y"):
                    for tx in T.thread_binding(TX, thread="threadIdx.x"):
                        with T.sblock("gemv"):
                            acc = T.sblock_alloc_buffer((R,), "float32", scope="local")
                            part = T.sblock_alloc_buffer((R,), "float32", scope="local")
                            wv = T.sblock_alloc_buffer((U, R, 4), "uint32", scope="local")
                            sc = T.sblock_alloc_buffer((U, R), "float32", scope="local")
                            xh = T.sblock_alloc_buffer((16,), "float16", scope="local")
                            xf = T.sblock_alloc_buffer((16,), "float32", scope="local")
                            red = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            for r in T.unroll(R):
                                acc[r] = T.float32(0)
                            for o in T.serial(OUTER):
                                for u in T.unroll(U):
                                    for r in T.unroll(R):
                                        if (not K_TAIL) or (chunk(o, u, tx) < CH):
                                            for v in T.vectorized(4):
                                                wv[u, r, v] = wu[T.min(row(by, ty, r), N - 1), chunk(o, u, tx) * 4 + v]
                                            sc[u, r] = T.Cast("float32", scales[T.min(row(by, ty, r), N - 1), chunk(o, u, tx) // CPG])
                                for u in T.unroll(U):
                                    if (not K_TAIL) or (chunk(o, u, tx) < CH):
                                        for h in T.unroll(2):
                                            for v in T.vectorized(8):
                                                xh[h * 8 + v] = x[bx, chunk(o, u, tx) * 16 + h * 8 + v]
                                        for v in T.unroll(16):
                                            xf[v] = T.Cast("float32", xh[v])
                                        for r in T.unroll(R):
                                            part[r] = T.float32(0)
                                            for j in T.unroll(4):
                                                part[r] = T.cuda.func_call(
                                                    "awq_i8_dot4", wv[u, r, j], xf[j * 4], xf[j * 4 + 1], xf[j * 4 + 2],
                                                    xf[j * 4 + 3], part[r], source_code=_I8_DOT4_SOURCE, return_type="float32")
                                            acc[r] = acc[r] + part[r] * sc[u, r]
                            for r in T.unroll(R):
                                red[0] = acc[r]
                                for s in T.unroll(NSHUF):
                                    red[0] = red[0] + T.tvm_warp_shuffle_xor(
                                        T.tvm_warp_activemask(), red[0], T.shift_right(TX, s + 1), TX, 32)
                                if tx == 0 and row(by, ty, r) < N:
                                    y[bx, row(by, ty, r)] = red[0]

    return gemv


def gemv_w8a16(N: int, K: int, group_size: int, target, M: int | None = None, rows: int = 4, task_rows: int = 16,
               prefetch: int = 4):
    """A scheduled TIR PrimFunc (x f16 [M, K], weight int8 [N, K], scales f16 [N, K/G], y f32 [M, N]) for
    `target` (a name from tvm_kernels.targets or a DeviceTarget: llvm or CUDA). M is symbolic (any number of
    rows of x: decode's one, prefill_logits' chunk); an int M is accepted and checked, for symmetry with
    gemv_w4a16. `rows` (rows per step), `task_rows` (rows per parallel task) and `prefetch` are CPU
    benchmark knobs."""
    N, K, group_size = int(N), int(K), int(group_size)
    _check(N, K, group_size, "gemv_w8a16")
    if M is not None and int(M) < 1:
        raise UserError(f"gemv_w8a16: M={M} must be at least 1")
    if rows < 1 or task_rows % rows:
        raise UserError(f"gemv_w8a16: task_rows {task_rows} must be a multiple of rows {rows}")
    t = get_target(target)
    if t.is_cuda:
        return _cuda_kernel(N, K, group_size)
    return _cpu_kernel(N, K, group_size, M, R=rows, NT=task_rows, PD=prefetch)
