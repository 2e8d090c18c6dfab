"""Decode GEMV y[M, N] = x[M, K] @ dequant(W)^T for M = 1..8, INT4 weights in the kernel layout
(tvm_kernels/layout.py), FP16 activations and output, FP32 accumulation, dequantization in registers.

Why this shape of kernel (CUDA; one TIR schedule, tiled by `cuda_config` from the target's SM count):
- Decode is bound by reading the weights once. Each lane reads 16 bytes of one row per load (a uint4 =
  32 consecutive k), consecutive lanes read consecutive 16 bytes (coalesced along K), and a thread
  covers `rows` rows so the activations it loads are reused across rows.
- The dequantize path, not memory, limits the stock schedule (dlight W4: ~1.05 TB/s on the H100), so
  the inner step is counted in instructions. (w >> 4j) & 0x000F000F | 0x64006400 is the half2
  (1024 + q_j, 1024 + q_{j+4}): two nibbles become fp16 with one shift + one LOP3 and no int->float
  conversion; subtracting the half2 (1024 + z) leaves the exact integers q - z; HFMA2 multiplies two
  at a time (~2 instructions per weight against ~4.4 for an fp32 path, which measured 1.8 TB/s).
  Activations are paired to match with one __byte_perm per two halves, shared by all rows of a thread.
- Precision: the 8 products of one 32-bit word are summed in fp16 (each |q - z| <= 15, exact), then
  converted and accumulated in fp32; the scale is applied once per 32 elements in fp32
  (sum_k x*(q - z)*s = s * sum_k x*(q - z) within a group). Relative error ~4e-4 against float32.
- K is split over `tx` lanes of a warp (warp-shuffle reduction) and, for long rows, over `ksplit`
  warps (one shared-memory combine): more independent loads in flight per row.
- Odd shapes stay in this kernel: rows past N are clamped for loading and skipped at the store;
  chunks past K/32 are predicated off.
- Decode's small neighbours can live inside it, since at batch 1 a launch costs as much as the op: the
  gated MLP's act(gate) * up (epilogue), the residual add (epilogue) and the RMSNorm of the residual
  stream (prologue: every block normalizes x into shared memory, its first weight loads already issued).
  The prologue's cost grows with the block count; export uses it for small models only (export/model.py).
- On sm_90 each block, when done, asks the L2 for its share of the next GEMV's leading rows (one bulk
  prefetch per region, `L2Prefetch`): at batch 1 every kernel starts with its loads' full latency and ends
  with a tail, and the next matrix's bytes fill that time (7B decode x1.02, SmolLM2 x1.01-1.04).

CPU (llvm): compute-bound on one core (hot or cold weights run at the same speed on a 2-core x86), so
the inner step is counted in vector instructions: 8 consecutive words of a row are one vector, nibble j
of all 8 comes out with one AND and one int->float convert (kept in place, as q * 16^j, against
activations pre-scaled by 16^-j), one FMA; the zero point and the activation permutation/conversion
are handled once per call; two rows per step share each activation load; rows parallel over cores.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from tvm_kernels.errors import UserError
from tvm_kernels.layout import GROUP_SIZES, dequantize_kernel_layout
from tvm_kernels.targets import DeviceTarget, get_target

MAX_M = 8


def reference(x: np.ndarray, weight: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int) -> np.ndarray:
    """numpy float32 y[M, N] = x @ dequant(W)^T (the kernels round the result to fp16)."""
    W = dequantize_kernel_layout(weight, scales, zeros, group_size)
    return np.asarray(x, dtype=np.float32) @ W.T


def _check_shape(N: int, K: int, group_size: int, M: int) -> None:
    if group_size not in GROUP_SIZES:
        raise UserError(f"gemv_w4a16: group size must be one of {GROUP_SIZES}, got {group_size}")
    if N <= 0 or K <= 0 or K % group_size:
        raise UserError(f"gemv_w4a16: K={K} must be a positive multiple of the group size {group_size} (N={N})")
    if not 1 <= M <= MAX_M:
        raise UserError(f"gemv_w4a16: M={M} is a decode batch (1..{MAX_M}); larger M belongs to gemm_w4a16")


@dataclass(frozen=True)
class CudaConfig:
    tx: int  # lanes splitting K (power of two <= 32), reduced by warp shuffles
    rows: int  # rows per thread (activation reuse)
    ty: int  # thread rows per block
    unroll: int  # 16-byte chunks per lane per loop step (loads in flight)
    ksplit: int = 1  # warps splitting K for the same rows (more loads in flight when K is long), summed in shared memory
    # "f16x2" is the one math path. An fp32 path (q | 0x4B000000 as float = 2^23 + q, exact q - z, FFMA) was
    # measured side by side on the H100 and removed: instruction-bound at ~1.8 TB/s (benchmarks/results).
    math: str = "f16x2"
    f16_words: int = 1  # f16x2: 32-bit words (8 products) summed in fp16 before the fp32 accumulator


@dataclass(frozen=True)
class L2Prefetch:
    """The leading `rows` rows of the next decode GEMV's matrix (N x K, group G: its weight, scales and zeros)
    that this GEMV's blocks ask the L2 to fetch when they finish (sm_90 bulk prefetch, no completion to wait
    for). The next GEMV then reads them from L2; their HBM traffic fills time the memory would stand idle:
    this kernel's tail, the launch and any norm kernel between, the next kernel's first loads."""
    N: int
    K: int
    G: int
    rows: int

    def regions(self) -> list[tuple[str, int]]:
        """(buffer, bytes) of the leading rows: all multiples of 16 bytes (the bulk prefetch's unit)."""
        return [("pf_w", self.rows * self.K // 2), ("pf_s", self.rows * self.K // self.G * 2),
                ("pf_z", self.rows * self.K // self.G * 2)]


def prefetch_rows(N: int, K: int, G: int, budget: int) -> int:
    """How many leading rows of an N x K (group G) W4 matrix fit `budget` bytes, in steps of 16 rows (so each
    region is a multiple of 16 bytes for any K, G)."""
    row_bytes = sum(size for _, size in L2Prefetch(N, K, G, rows=1).regions())
    return min(N, budget // row_bytes) // 16 * 16


# How much of the next decode GEMV's matrix a GEMV prefetches into L2 (sm_90; bytes). Measured side by side on
# the H100 (benchmarks/results/l2_prefetch_ab_h100.json): 4 MB (the whole next matrix for SmolLM2) against none,
# 7B x1.02-1.03 at 128 / 512 / 2048 tokens (two runs of 10 and 8 rounds; x1.02 / 1.05 in a third), SmolLM2
# x1.01-1.04; 2, 6 and 8 MB were no better, nor issuing it when each block starts (x0.95-1.00). The qkv GEMV
# does not prefetch o_proj across the attention: its blocks all finish together, so the prefetch lands in the
# qkv kernel's own time (qkv 11.5 -> 13.4 us alone) while o_proj from L2 takes 4.6 us against 5.4 (7B
# x0.98-1.03 with o_proj prefetched).
PREFETCH_AFTER_ATTENTION_BYTES = 0
PREFETCH_BYTES = 4 << 20


def l2_prefetch_plan(N: int, K: int, G: int, target, *, after_attention: bool) -> L2Prefetch | None:
    """The L2Prefetch a decode GEMV issues for the next one (N x K, group G) on `target`, or None: targets
    before sm_90 have no bulk prefetch, and the budget was measured on the H100 (50 MB of L2) only, so sm_120
    (RTX 5090, 96 MB) keeps none until measured there; a zero budget turns it off."""
    t = get_target(target)
    budget = PREFETCH_AFTER_ATTENTION_BYTES if after_attention else PREFETCH_BYTES
    if not (t.is_cuda and t.sm == 90) or budget <= 0:
        return None
    rows = prefetch_rows(N, K, G, budget)
    return L2Prefetch(N=N, K=K, G=G, rows=rows) if rows > 0 else None


def fewest_idle(n: int, choices) -> int:
    """The choice c that leaves the fewest of the ceil(n / c) * c slots idle for n items (chunks over lanes,
    loop steps over an unroll), the largest among ties."""
    return min(choices, key=lambda c: (-(-n // c) * c - n, -c))


def cuda_config(N: int, K: int, M: int, target: DeviceTarget) -> CudaConfig:
    """Tiling from the shape and the target (SM count), chosen from H100 sweeps (benchmarks/kernels.py):
    half2 math (the fp32 path is instruction-bound at ~1.8 TB/s), two rows per thread at M = 1 and four
    when several activation rows share each weight load, K split over two warps for long rows; at M = 1
    with K >= 2048, four rows per thread for large grids, a K split for small ones and K over four warps
    for short matrices (see the end)."""
    chunks = K // 32
    tx = 32
    while tx > 4 and tx > chunks:
        tx //= 2
    rows = 2 if M == 1 else 4
    ty = max(1, 128 // tx)
    ksplit = 1
    while ksplit < 4 and chunks > 8 * tx * ksplit:
        ksplit *= 2
    # at least two waves of blocks; fewer rows per thread when the matrix is short
    while rows > 1 and -(-N // (ty * rows)) < 2 * max(target.num_sms, 1):
        rows //= 2
    iters = -(-chunks // (tx * ksplit))
    # the largest unroll whose last step wastes the fewest predicated-off slots (down_proj at ksplit 2:
    # 6 steps -> unroll 2, measured 13.2 us against 15.9 us at unroll 4 on the H100)
    unroll = fewest_idle(iters, [u for u in (4, 2, 1) if u <= (4 if M == 1 else 2)])
    unroll = min(unroll, iters)
    if M == 1 and chunks >= 64 and rows == 2:
        # long rows (K >= 2048) at batch 1, from three H100 sweeps that agree (gemv_sweep_tiles_h100.json,
        # pdl_ab_h100.json): a grid of >= 8 blocks per SM runs best with four rows per thread in 64-thread
        # blocks (7B qkv 12.0 us against 12.7); a smaller one with K over (at least) two warps and one chunk
        # per step, more blocks' loads in flight (o_proj 5.8 against 6.1, down_proj 12.5 against 12.9)
        if -(-N // (ty * rows)) >= 8 * max(target.num_sms, 1):
            rows, ty = 4, ty // 2
        else:
            ksplit, unroll = max(ksplit, 2), 1
    elif M == 1 and chunks >= 64 and rows == 1:
        # few rows of long K (~1B models' down / o_proj, N <~ 2100 on an H100): two rows per thread, K over
        # four warps (gemv_sweep_small_h100.json: Gemma3-1B down 4.7 us against 7.6, Llama-3.2-1B down 5.8
        # against 7.8, o_proj 3.2 against 3.6, Qwen2-0.5B down 3.9 against 5.8)
        rows, ty, ksplit, unroll = 2, 2, 4, 1
    return CudaConfig(tx=tx, rows=rows, ty=ty, unroll=unroll, ksplit=ksplit, math="f16x2", f16_words=1)


# f16x2 inner step (CUDA device code called from the TIR kernel): one 32-bit word = 8 nibbles against 8
# activations. (w >> 4j) & 0x000F000F | 0x64006400 is the half2 (1024 + q_j, 1024 + q_{j+4}) with no
# int->float conversion; subtracting the half2 (1024 + z) leaves the exact integers q - z; HFMA2 then does
# two products per instruction. Activations arrive pre-paired as (x_j, x_{j+4}) by __byte_perm.
_H2_SOURCE = r"""
__device__ __forceinline__ unsigned awq_w4_fma8(unsigned w, unsigned x0, unsigned x1, unsigned x2, unsigned x3,
                                                unsigned zz, unsigned acc) {
  half2 a = *reinterpret_cast<half2*>(&acc);
  const half2 z = *reinterpret_cast<const half2*>(&zz);
  unsigned q0 = (w & 0x000F000Fu) | 0x64006400u;
  unsigned q1 = ((w >> 4) & 0x000F000Fu) | 0x64006400u;
  unsigned q2 = ((w >> 8) & 0x000F000Fu) | 0x64006400u;
  unsigned q3 = ((w >> 12) & 0x000F000Fu) | 0x64006400u;
  a = __hfma2(*reinterpret_cast<const half2*>(&x0), __hsub2(*reinterpret_cast<const half2*>(&q0), z), a);
  a = __hfma2(*reinterpret_cast<const half2*>(&x1), __hsub2(*reinterpret_cast<const half2*>(&q1), z), a);
  a = __hfma2(*reinterpret_cast<const half2*>(&x2), __hsub2(*reinterpret_cast<const half2*>(&q2), z), a);
  a = __hfma2(*reinterpret_cast<const half2*>(&x3), __hsub2(*reinterpret_cast<const half2*>(&q3), z), a);
  return *reinterpret_cast<unsigned*>(&a);
}
"""
_H2SUM_SOURCE = r"""
__device__ __forceinline__ float awq_h2_sum(unsigned acc) {
  const float2 f = __half22float2(*reinterpret_cast<const half2*>(&acc));
  return f.x + f.y;
}
"""


_PREFETCH_SOURCE = r"""
__device__ __forceinline__ void awq_prefetch_l2(const void* p, int bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(p), "r"((unsigned)bytes) : "memory");
}
"""


_PACK_SOURCE = r"""
__device__ __forceinline__ unsigned awq_pack_h2(float a, float b) {
  half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<unsigned*>(&h);
}
"""


def _cuda_kernel(N: int, K: int, G: int, M: int, cfg: CudaConfig, glu: str | None = None,
                 norm_eps: float | None = None, residual: bool = False, prefetch: L2Prefetch | None = None):
    from tvm.script import tirx as T

    TX, R, TY, U, KS, FW = cfg.tx, cfg.rows, cfg.ty, cfg.unroll, cfg.ksplit, cfg.f16_words
    if FW not in (1, 2, 4):
        raise UserError(f"gemv_w4a16: f16_words must be 1, 2 or 4, got {FW}")
    CH = K // 32
    CPG = G // 32
    ITERS = -(-CH // (TX * KS))
    OUTER = -(-ITERS // U)
    K_TAIL = OUTER * U * TX * KS != CH
    ROWS_PER_BLOCK = TY * R
    NB = -(-N // ROWS_PER_BLOCK)
    KW, NG = K // 8, K // G
    NSHUF = TX.bit_length() - 1
    GLU = glu is not None
    NY = N // 2 if GLU else N  # glu: rows (2j, 2j + 1) are (gate_j, up_j) and y[:, j] = act(gate_j) * up_j
    if glu and (R % 2 or N % 2):
        raise UserError(f"gemv_w4a16: the gated epilogue needs an even row count per thread and N (rows={R}, N={N})")
    NORM, RES = norm_eps is not None, residual
    if NORM and (TY * KS * TX) % 32:
        raise UserError(f"gemv_w4a16: the norm prologue reduces over whole warps; {TY * KS * TX} threads per block")
    if RES and GLU:
        raise UserError("gemv_w4a16: the residual epilogue and the gated epilogue do not combine")
    THREADS = TY * KS * TX
    # norm: the block's threads normalize x (8 halves each per step) into shared memory before the main loop
    NSTEP = -(-(K // 8) // THREADS)
    NWARP = -(-THREADS // 32)
    KX = K // 2 if NORM else 1  # shared words of the normalized x (none without the prologue)
    inv_k, eps = T.float32(1.0 / K), T.float32(norm_eps or 0.0)
    PF = prefetch is not None
    pf = prefetch or L2Prefetch(N=16, K=32, G=32, rows=16)  # shapes for the unused (dropped) buffers
    # each block prefetches its 1/NB slice of every region, rounded up to 16 bytes
    PF_REGIONS = [(name, size, -(-size // (16 * NB)) * 16) for name, size in pf.regions()]

    def tid(ty, tx):
        return ty * TX + tx

    def xword(xu, xs, m, idx):  # a 32-bit pair of activations: normalized in shared memory, or x itself
        return xs[m, idx] if NORM else xu[m, idx]

    def out(y_acc, r_in, m, n):  # the stored value: fp16(acc), plus the residual as the unfused add did (in fp16)
        v = T.Cast("float16", y_acc)
        return v + r_in[m, n] if RES else v

    # Index helpers (plain Python, expanded by the TVMScript parser into the expressions they return).
    def chunk(o, u, ty, tx):  # the 16-byte chunk of a row this lane reads at step (o, u)
        return ((o * U + u) * KS + ty // TY) * TX + tx

    def row(bx, ty, r):  # the output row; loads clamp it to N - 1 and the store skips it past N
        return (bx * TY + ty % TY) * R + r

    @T.macro
    def load_step(o, bx, ty, tx, weight, scales, zeros, wv, sc, zz):  # this lane's weights, scales, zeros of step o
        for u in T.unroll(U):
            for r in T.unroll(R):
                if (not K_TAIL) or (chunk(o, u, ty, tx) < CH):
                    for v in T.vectorized(4):
                        wv[u, r, v] = weight[T.min(row(bx, ty, r), N - 1), chunk(o, u, ty, tx) * 4 + v]
                    sc[u, r] = T.Cast("float32", scales[T.min(row(bx, ty, r), N - 1), chunk(o, u, ty, tx) // CPG])
                    zz[u, r] = (T.Cast("uint32", zeros[T.min(row(bx, ty, r), N - 1), chunk(o, u, ty, tx) // CPG])
                                + T.uint32(0x6400)) * T.uint32(0x00010001)

    @T.macro
    def prefetch_region(buf, size, step, esize, width, bx):  # this block's slice of one region of the next matrix
        if bx * step < size:
            T.evaluate(T.cuda.func_call("awq_prefetch_l2",
                                        T.address_of(buf[bx * step // esize // width, bx * step // esize % width]),
                                        T.min(step, size - bx * step),
                                        source_code=_PREFETCH_SOURCE, return_type="void"))

    @T.prim_func(s_tir=True)
    def gemv(
        x: T.Buffer((M, K), "float16"),
        weight: T.Buffer((N, KW), "uint32"),
        scales: T.Buffer((N, NG), "float16"),
        zeros: T.Buffer((N, NG), "float16"),
        gamma: T.Buffer((K,), "float16"),  # norm: the RMSNorm weight (unused otherwise; dropped below)
        r_in: T.Buffer((M, N), "float16"),  # residual: added to y (unused otherwise; dropped below)
        pf_w: T.Buffer((pf.N, pf.K // 8), "uint32"),  # prefetch: the next GEMV's matrix (dropped otherwise)
        pf_s: T.Buffer((pf.N, pf.K // pf.G), "float16"),
        pf_z: T.Buffer((pf.N, pf.K // pf.G), "float16"),
        y: T.Buffer((M, NY), "float16"),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        xu = T.decl_buffer((M, K // 2), "uint32", data=x.data)
        for bx in T.thread_binding(NB, thread="blockIdx.x"):
            for ty in T.thread_binding(TY * KS, thread="threadIdx.y"):
                for tx in T.thread_binding(TX, thread="threadIdx.x"):
                    with T.sblock("gemv"):
                        acc = T.sblock_alloc_buffer((M, R), "float32", scope="local")
                        part = T.sblock_alloc_buffer((M, R), "float32", scope="local")
                        h = T.sblock_alloc_buffer((M, R), "uint32", scope="local")
                        wv = T.sblock_alloc_buffer((U, R, 4), "uint32", scope="local")
                        sc = T.sblock_alloc_buffer((U, R), "float32", scope="local")
                        zz = T.sblock_alloc_buffer((U, R), "uint32", scope="local")
                        xw = T.sblock_alloc_buffer((4,), "uint32", scope="local")
                        xp = T.sblock_alloc_buffer((M, 4), "uint32", scope="local")
                        red = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        rv = T.sblock_alloc_buffer((M, R), "float32", scope="local")  # glu: the reduced rows
                        ksum = T.sblock_alloc_buffer((KS, TY, M, R), "float32", scope="shared")
                        xs = T.sblock_alloc_buffer((M, KX), "uint32", scope="shared")
                        if NORM:
                            # RMSNorm of x, as tvm_kernels/fused_ops computes it (fp32 statistics, fp16(x * r * w)),
                            # by every block: x is small and read from L2, a kernel launch is saved. The weights of
                            # the first step are requested first, so their latency overlaps this work.
                            xv = T.sblock_alloc_buffer((M, NSTEP, 8), "float16", scope="local")
                            gv = T.sblock_alloc_buffer((8,), "float16", scope="local")
                            ss = T.sblock_alloc_buffer((M,), "float32", scope="local")
                            wsum = T.sblock_alloc_buffer((NWARP, M), "float32", scope="shared")
                            load_step(0, bx, ty, tx, weight, scales, zeros, wv, sc, zz)
                            for m in T.unroll(M):
                                ss[m] = T.float32(0)
                                for i in T.unroll(NSTEP):
                                    if i * THREADS + tid(ty, tx) < K // 8:
                                        for v in T.vectorized(8):
                                            xv[m, i, v] = x[m, (i * THREADS + tid(ty, tx)) * 8 + v]
                                        for v in T.unroll(8):
                                            ss[m] = ss[m] + T.Cast("float32", xv[m, i, v]) * T.Cast("float32", xv[m, i, v])
                                for s in T.unroll(5):
                                    ss[m] = ss[m] + T.tvm_warp_shuffle_xor(
                                        T.tvm_warp_activemask(), ss[m], T.shift_right(32, s + 1), 32, 32)
                                if tid(ty, tx) % 32 == 0:
                                    wsum[tid(ty, tx) // 32, m] = ss[m]
                            T.tvm_storage_sync("shared")
                            for m in T.unroll(M):
                                ss[m] = wsum[0, m]
                                for w in T.unroll(1, NWARP):
                                    ss[m] = ss[m] + wsum[w, m]
                                ss[m] = T.rsqrt(ss[m] * inv_k + eps)
                                for i in T.unroll(NSTEP):
                                    if i * THREADS + tid(ty, tx) < K // 8:
                                        for v in T.vectorized(8):
                                            gv[v] = gamma[(i * THREADS + tid(ty, tx)) * 8 + v]
                                        for e in T.unroll(4):
                                            xs[m, (i * THREADS + tid(ty, tx)) * 4 + e] = T.cuda.func_call(
                                                "awq_pack_h2",
                                                T.Cast("float32", xv[m, i, 2 * e]) * ss[m] * T.Cast("float32", gv[2 * e]),
                                                T.Cast("float32", xv[m, i, 2 * e + 1]) * ss[m] * T.Cast("float32", gv[2 * e + 1]),
                                                source_code=_PACK_SOURCE, return_type="uint32")
                            T.tvm_storage_sync("shared")
                        for m, r in T.grid(M, R):
                            acc[m, r] = T.float32(0)
                        for o in T.serial(OUTER):
                            if (not NORM) or o > 0:  # the norm prologue issued step 0's loads first
                                load_step(o, bx, ty, tx, weight, scales, zeros, wv, sc, zz)
                            for u in T.unroll(U):
                                if (not K_TAIL) or (chunk(o, u, ty, tx) < CH):
                                    for m, r in T.grid(M, R):
                                        part[m, r] = T.float32(0)
                                        h[m, r] = T.uint32(0)
                                    for j in T.unroll(4):
                                        for m in T.unroll(M):
                                            for v in T.vectorized(4):
                                                xw[v] = xword(xu, xs, m, chunk(o, u, ty, tx) * 16 + j * 4 + v)
                                            for jj in T.unroll(4):
                                                xp[m, jj] = T.call_pure_extern(
                                                    "uint32", "__byte_perm", xw[jj // 2], xw[jj // 2 + 2],
                                                    T.if_then_else(jj % 2 == 0, T.uint32(0x5410), T.uint32(0x7632)),
                                                )
                                            for r in T.unroll(R):
                                                h[m, r] = T.cuda.func_call(
                                                    "awq_w4_fma8", wv[u, r, j], xp[m, 0], xp[m, 1], xp[m, 2], xp[m, 3],
                                                    zz[u, r], h[m, r], source_code=_H2_SOURCE, return_type="uint32",
                                                )
                                        if (j + 1) % FW == 0:
                                            for m, r in T.grid(M, R):
                                                part[m, r] = part[m, r] + T.cuda.func_call(
                                                    "awq_h2_sum", h[m, r], source_code=_H2SUM_SOURCE, return_type="float32")
                                                h[m, r] = T.uint32(0)
                                    for m, r in T.grid(M, R):
                                        acc[m, r] = acc[m, r] + part[m, r] * sc[u, r]
                        for m in T.unroll(M):
                            for r in T.unroll(R):
                                red[0] = acc[m, r]
                                for s in T.unroll(NSHUF):
                                    red[0] = red[0] + T.tvm_warp_shuffle_xor(
                                        T.tvm_warp_activemask(), red[0], T.shift_right(TX, s + 1), TX, 32
                                    )
                                if KS == 1:
                                    if GLU:
                                        rv[m, r] = red[0]
                                    elif tx == 0 and row(bx, ty, r) < N:
                                        y[m, row(bx, ty, r)] = out(red[0], r_in, m, row(bx, ty, r))
                                else:
                                    if tx == 0:
                                        ksum[ty // TY, ty % TY, m, r] = red[0]
                        if KS > 1:
                            # the K slices of one row live in different warps: combine through shared memory
                            T.tvm_storage_sync("shared")
                            for m in T.unroll(M):
                                for r in T.unroll(R):
                                    if ty // TY == 0 and tx == 0 and row(bx, ty, r) < N:
                                        red[0] = ksum[0, ty % TY, m, r]
                                        for kz in T.unroll(1, KS):
                                            red[0] = red[0] + ksum[kz, ty % TY, m, r]
                                        if GLU:
                                            rv[m, r] = red[0]
                                        else:
                                            y[m, row(bx, ty, r)] = out(red[0], r_in, m, row(bx, ty, r))
                        if GLU:
                            for m in T.unroll(M):
                                for p in T.unroll(R // 2):
                                    if ty // TY == 0 and tx == 0 and row(bx, ty, 2 * p) < N:
                                        y[m, row(bx, ty, 2 * p) // 2] = T.Cast(
                                            "float16", _activation(T, glu, rv[m, 2 * p]) * rv[m, 2 * p + 1])
                        if PF:
                            if ty == 0 and tx == 0:
                                prefetch_region(pf_w, PF_REGIONS[0][1], PF_REGIONS[0][2], 4, pf.K // 8, bx)
                                prefetch_region(pf_s, PF_REGIONS[1][1], PF_REGIONS[1][2], 2, pf.K // pf.G, bx)
                                prefetch_region(pf_z, PF_REGIONS[2][1], PF_REGIONS[2][2], 2, pf.K // pf.G, bx)

    return _drop_params(gemv, {"gamma": NORM, "r_in": RES, "pf_w": PF, "pf_s": PF, "pf_z": PF})


def _drop_params(func, keep: dict[str, bool]):
    """`func` without the buffer parameters whose name maps to False (the body must not use them): one
    TVMScript body serves every variant, each PrimFunc takes only the inputs it reads."""
    from tvm import tirx

    params = [p for p in func.params if keep.get(p.name, True)]
    return tirx.PrimFunc(params, func.body, func.ret_type, func.attrs)


GLU_ACTIVATIONS = ("silu", "gelu_tanh")


def _activation(T, name: str, g):
    """act(gate) in float32 for the gated epilogue (the unfused path's op.silu / op.gelu(approximate="tanh"))."""
    if name == "silu":
        return g / (T.float32(1) + T.exp(-g))
    return T.float32(0.5) * g * (T.float32(1) + T.tanh(T.float32(0.7978845608028654) * (g + T.float32(0.044715) * g * g * g)))


def reference_norm(x: np.ndarray, gamma: np.ndarray, eps: float) -> np.ndarray:
    """numpy: the activations the norm prologue feeds the GEMV, fp16(x * rsqrt(mean(x^2) + eps) * gamma): what
    the norm kernel it replaces writes (tvm_kernels/fused_ops.reference, rounded to fp16 as stored)."""
    from tvm_kernels.fused_ops import reference as norm_reference

    return norm_reference(x, None, gamma, eps)[0].astype(np.float16)


def reference_glu(x: np.ndarray, weight: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int,
                  activation: str) -> np.ndarray:
    """numpy float32 act(x @ gate^T) * (x @ up^T) for weights whose rows interleave gate and up."""
    y = reference(x, weight, scales, zeros, group_size)
    g, u = y[:, 0::2], y[:, 1::2]
    if activation == "silu":
        return g / (1 + np.exp(-g)) * u
    return 0.5 * g * (1 + np.tanh(0.7978845608028654 * (g + 0.044715 * g ** 3))) * u


def _cpu_kernel(N: int, K: int, G: int, M: int, target: DeviceTarget):
    from tvm.script import tirx as T

    # Counted in vector instructions per 8 weights (one 32-bit word). Per row, VL consecutive words are
    # one vector load (VL = 8 lanes on AVX2, 4 when K/8 is not a multiple of 8); nibble j of every lane
    # comes out with a single AND against 0xF << 4j, kept in place: converted to float it is the exact
    # q * 16^j, and the activations are pre-scaled by 16^-j (exact, a power of two) in a permuted copy
    # xp[m, c, j, lane] = x[m, 8 (VL c + lane) + j] / 16^j, built once per call and shared by all rows.
    # Nibble 7 would be negative as int32, so it is shifted down instead. That is AND + convert + FMA per
    # 8 weights (the broadcast/variable-shift/subtract form took 6). The zero point leaves the nibble loop:
    # sum_k x (q - z) = sum_k x q - z sum_k x, one FMA per VL words against the per-lane sums of x
    # (xs[m, c, lane] = sum_j x[m, 8 (VL c + lane) + j], also computed once per call).
    NG, KW = K // G, K // 8
    VL = 8 if KW % 8 == 0 else 4
    NC = KW // VL
    R = 2  # rows per step: each activation load feeds R FMAs

    def row(nr, r):  # rows past N (odd N) are clamped for loading and skipped at the store
        return T.min(nr * R + r, N - 1)

    @T.prim_func(s_tir=True)
    def gemv(
        x: T.Buffer((M, K), "float16"),
        weight: T.Buffer((N, KW), "uint32", align=4),  # arrays may come from numpy (16-byte aligned): no aligned vector loads
        scales: T.Buffer((N, NG), "float16"),
        zeros: T.Buffer((N, NG), "float16"),
        y: T.Buffer((M, N), "float16"),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        xp = T.alloc_buffer((M, NC, 8, VL), "float32")
        xs = T.alloc_buffer((M, NC, VL), "float32")
        for m, c, j in T.grid(M, NC, 8):
            for v in T.vectorized(VL):
                with T.sblock("xp"):
                    vm, vc, vj, vv = T.axis.remap("SSSS", [m, c, j, v])
                    xp[vm, vc, vj, vv] = T.Cast("float32", x[vm, (vc * VL + vv) * 8 + vj]) * T.if_then_else(
                        vj == 7, T.float32(1), T.pow(T.float32(0.0625), T.Cast("float32", vj)))
        for m, c in T.grid(M, NC):
            for v in T.vectorized(VL):
                with T.sblock("xs"):
                    vm, vc, vv = T.axis.remap("SSS", [m, c, v])
                    xs[vm, vc, vv] = T.float32(0)
                    for j in T.serial(8):
                        xs[vm, vc, vv] = xs[vm, vc, vv] + T.Cast("float32", x[vm, (vc * VL + vv) * 8 + j])
        for nr in T.parallel((N + R - 1) // R):
            with T.sblock("rows"):
                vnr = T.axis.spatial((N + R - 1) // R, nr)
                # default scope: small constant-size buffers become stack allocas that LLVM keeps in
                # registers (scope "local" would call the workspace allocator once per row)
                acc = T.sblock_alloc_buffer((R, M, VL), "float32")
                part = T.sblock_alloc_buffer((R, M, 2, VL), "float32")
                d = T.sblock_alloc_buffer((R, VL), "float32")
                red = T.sblock_alloc_buffer((M,), "float32")
                for r, m in T.grid(R, M):
                    for v in T.vectorized(VL):
                        acc[r, m, v] = T.float32(0)
                for c in T.serial(NC):
                    for r, m, a in T.grid(R, M, 2):
                        for v in T.vectorized(VL):
                            part[r, m, a, v] = T.float32(0)
                    for j in T.unroll(8):
                        for r in T.unroll(R):
                            for v in T.vectorized(VL):
                                d[r, v] = T.Cast("float32", T.Cast("int32", T.if_then_else(
                                    j == 7,
                                    T.shift_right(weight[row(vnr, r), c * VL + v], T.uint32(28)),
                                    T.bitwise_and(weight[row(vnr, r), c * VL + v],
                                                  T.shift_left(T.uint32(15), T.Cast("uint32", 4 * j))),
                                )))
                        for m in T.serial(M):
                            for r in T.unroll(R):
                                for v in T.vectorized(VL):
                                    part[r, m, j % 2, v] = part[r, m, j % 2, v] + xp[m, c, j, v] * d[r, v]
                    for r in T.unroll(R):
                        for m in T.serial(M):
                            for v in T.vectorized(VL):
                                acc[r, m, v] = acc[r, m, v] + (part[r, m, 0, v] + part[r, m, 1, v] - T.Cast(
                                    "float32", zeros[row(vnr, r), (c * VL + v) * 8 // G]) * xs[m, c, v]) * T.Cast(
                                    "float32", scales[row(vnr, r), (c * VL + v) * 8 // G])
                for r in T.unroll(R):
                    for m in T.serial(M):
                        red[m] = T.float32(0)
                        for v in T.serial(VL):
                            red[m] = red[m] + acc[r, m, v]
                        if vnr * R + r < N:
                            y[m, vnr * R + r] = T.Cast("float16", red[m])

    return gemv


def gemv_w4a16(N: int, K: int, group_size: int, target, M: int = 1, config: CudaConfig | None = None,
               glu: str | None = None, norm_eps: float | None = None, residual: bool = False,
               prefetch: L2Prefetch | None = None):
    """A scheduled TIR PrimFunc (x f16 [M, K], weight u32 [N, K/8], scales f16 [N, K/G], zeros f16 [N, K/G],
    y f16 [M, N]) for `target` (a name from tvm_kernels.targets or a DeviceTarget).
    `config` overrides the CUDA tiling (benchmarks sweep it).
    `glu` ("silu" / "gelu_tanh", CUDA): the rows interleave gate and up (row 2j = gate_j, 2j + 1 = up_j) and
    the kernel writes y [M, N/2] = act(gate) * up — the MLP's activation without a kernel of its own.
    Decode's other neighbours, also CUDA only, so that the add + RMSNorm between two linears needs no kernel:
    `norm_eps`: x is the residual stream and the kernel multiplies rms_norm(x) * gamma (a parameter after
    zeros, f16 [K]); `residual`: y = fp16(x @ W^T) + r (a parameter r f16 [M, N] before y), the residual add.
    `prefetch` (sm_90): the next GEMV's weight, scales and zeros (parameters pf_w, pf_s, pf_z before y), whose
    leading rows the blocks send to L2 as they finish (L2Prefetch)."""
    N, K, group_size, M = int(N), int(K), int(group_size), int(M)
    _check_shape(N, K, group_size, M)
    t = get_target(target)
    if glu is not None and (glu not in GLU_ACTIVATIONS or not t.is_cuda):
        raise UserError(f"gemv_w4a16: gated epilogue {glu!r} on {t.name}: CUDA targets with {GLU_ACTIVATIONS} only")
    if (norm_eps is not None or residual) and not t.is_cuda:
        raise UserError(f"gemv_w4a16: the norm prologue and the residual epilogue are CUDA kernels; target {t.name}")
    if prefetch is not None and not (t.is_cuda and t.sm >= 90):  # the instruction exists from sm_90 on
        raise UserError(f"gemv_w4a16: the L2 prefetch epilogue needs sm_90's bulk prefetch; target {t.name}")
    if prefetch is not None and (prefetch.rows % 16 or not 0 < prefetch.rows <= prefetch.N):
        raise UserError(f"gemv_w4a16: prefetch rows {prefetch.rows} must be a positive multiple of 16 up to N={prefetch.N}")
    if t.is_cuda:
        cfg = config or cuda_config(N, K, M, t)
        if glu and cfg.rows % 2:  # a thread must hold both rows of a (gate, up) pair
            cfg = dataclasses.replace(cfg, rows=2 * cfg.rows)
        if cfg.math != "f16x2":
            raise UserError(f"gemv_w4a16: math {cfg.math!r} is not built (only f16x2; see CudaConfig)")
        return _cuda_kernel(N, K, group_size, M, cfg, glu=glu, norm_eps=norm_eps, residual=residual, prefetch=prefetch)
    return _cpu_kernel(N, K, group_size, M, t)
