"""Decode GEMV y[1, N] = x[1, K] @ dequant(W)^T fed by the Tensor Memory Accelerator (sm_90): a producer warp
streams tiles of whole weight rows into a ring of shared-memory stages with bulk copies, consumer warps
dequantize and multiply out of shared memory.

Why: tvm_kernels/gemv_w4a16's threads load their weights into registers and then compute, so the bytes in
flight per SM are bounded by registers and warps: its 7B GEMVs move ~2.2-2.4 TB/s, and with the math taken out
still only ~2.6 (benchmarks/results/gemv_math_h100.json), where a copy moves 2.9. Here one thread keeps
`stages` tiles of RT rows (each tile one contiguous run of the row-major weight, scales and zeros: three bulk
copies on one mbarrier) in flight per SM, independent of what the consumers are doing.

Layout of the work: one block per SM (persistent); block b takes tiles b, b + blocks, ...; consumer warp w
takes rows w * R .. w * R + R - 1 of each tile, lanes along K (16-byte chunks), the f16x2 inner step of
gemv_w4a16, a warp-shuffle reduction, the epilogue (plain or the gated act(gate) * up) from lane 0. The
consumers release a stage (an mbarrier counting C warps) as soon as they have read it; the producer refills it.
Activations are staged once per block in shared memory.

Requirements: N a multiple of 8 (so every tile's copies are whole 16-byte units), K a multiple of 32.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tvm_kernels.errors import UserError
from tvm_kernels.gemv_w4a16 import _H2_SOURCE, _H2SUM_SOURCE, _activation
from tvm_kernels.targets import get_target

SMEM_BYTES = 227 * 1024  # sm_90 per block (opt-in maximum)


@dataclass(frozen=True)
class TmaConfig:
    warps: int = 8  # consumer warps (a producer warp comes on top)
    rows: int = 2  # rows per consumer warp per tile
    stages: int = 0  # ring depth; 0: as many as fit (at most 8)
    hoist: bool = False  # a warp copies all its weights of a stage to registers, releases the stage, then computes


_SOURCES = {
    "awq_mbar_init": r"""
__device__ __forceinline__ void awq_mbar_init(void* base, int off, unsigned count) {
  unsigned a = (unsigned)__cvta_generic_to_shared((char*)base + off);
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(a), "r"(count) : "memory");
}
""",
    "awq_mbar_fence_init": r"""
__device__ __forceinline__ void awq_mbar_fence_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}
""",
    "awq_mbar_expect_tx": r"""
__device__ __forceinline__ void awq_mbar_expect_tx(void* base, int off, int bytes) {
  unsigned a = (unsigned)__cvta_generic_to_shared((char*)base + off);
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(a), "r"((unsigned)bytes) : "memory");
}
""",
    "awq_bulk_g2s": r"""
__device__ __forceinline__ void awq_bulk_g2s(void* base, int off, const void* src, int bytes, int bar_off) {
  unsigned d = (unsigned)__cvta_generic_to_shared((char*)base + off);
  unsigned b = (unsigned)__cvta_generic_to_shared((char*)base + bar_off);
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               :: "r"(d), "l"(src), "r"((unsigned)bytes), "r"(b) : "memory");
}
""",
    "awq_mbar_wait": r"""
__device__ __forceinline__ void awq_mbar_wait(void* base, int off, int parity) {
  unsigned a = (unsigned)__cvta_generic_to_shared((char*)base + off);
  asm volatile("{\n .reg .pred p;\n AWQ_WAIT_%=:\n"
               " mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
               " @!p bra AWQ_WAIT_%=;\n}" :: "r"(a), "r"((unsigned)parity) : "memory");
}
""",
    "awq_mbar_arrive": r"""
__device__ __forceinline__ void awq_mbar_arrive(void* base, int off) {
  unsigned a = (unsigned)__cvta_generic_to_shared((char*)base + off);
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(a) : "memory");
}
""",
    "awq_syncwarp": r"""
__device__ __forceinline__ void awq_syncwarp() { __syncwarp(); }
""",
}


def _round(n: int, a: int) -> int:
    return -(-n // a) * a


def plan(N: int, K: int, G: int, cfg: TmaConfig, num_sms: int) -> dict:
    """Byte offsets in the block's dynamic shared memory and the tiling."""
    RT = cfg.warps * cfg.rows
    if RT % 8:
        raise UserError(f"gemv_w4a16_tma: rows per tile {RT} must be a multiple of 8 (16-byte copies)")
    wbytes, sbytes = RT * K // 2, RT * (K // G) * 2
    stage = wbytes + 2 * _round(sbytes, 128)
    stage = _round(stage, 128)
    head = _round(8 * 2 * 8, 128) + _round(K * 2, 128)  # mbarriers (up to 8 stages x 2), x
    S = cfg.stages or min(8, (SMEM_BYTES - head) // stage)
    if S < 2 or head + S * stage > SMEM_BYTES:
        raise UserError(f"gemv_w4a16_tma: {S} stages of {stage} bytes do not fit {SMEM_BYTES} bytes of shared memory")
    NT = -(-N // RT)
    NB = min(num_sms, NT)
    return {"RT": RT, "S": S, "NT": NT, "NB": NB, "MAXT": -(-NT // NB), "wbytes": wbytes, "sbytes": sbytes,
            "XOFF": _round(8 * 2 * 8, 128), "SOFF": head, "STAGE": stage,
            "ZREL": wbytes + _round(sbytes, 128), "SREL": wbytes, "total": head + S * stage}


def gemv_w4a16_tma(N: int, K: int, G: int, target, cfg: TmaConfig | None = None, glu: str | None = None,
                   diag: str = ""):
    """diag (measurement only, wrong results): "nomath" consumers release each stage unread; "nocopy" the
    producer only signals (expect_tx 0), consumers compute on whatever shared memory holds."""
    from tvm.script import tirx as T

    t = get_target(target)
    if not (t.is_cuda and t.sm >= 90):
        raise UserError(f"gemv_w4a16_tma: needs sm_90's bulk copies; target {t.name}")
    if N % 8 or K % 32 or K % G:
        raise UserError(f"gemv_w4a16_tma: N={N} must be a multiple of 8, K={K} of 32 and of the group size {G}")
    NOCOPY, NOMATH = diag == "nocopy", diag == "nomath"
    cfg = cfg or TmaConfig()
    if glu is not None and cfg.rows % 2:  # a warp must hold both rows of a (gate, up) pair
        cfg = dataclasses.replace(cfg, rows=2 * cfg.rows)
    p = plan(N, K, G, cfg, t.num_sms)
    C, R = cfg.warps, cfg.rows
    RT, S, NT, NB, MAXT = p["RT"], p["S"], p["NT"], p["NB"], p["MAXT"]
    XOFF, SOFF, STAGE, SREL, ZREL = p["XOFF"], p["SOFF"], p["STAGE"], p["SREL"], p["ZREL"]
    KW, NG, CH, CPG = K // 8, K // G, K // 32, G // 32
    ITERS = -(-CH // 32)
    HOIST = cfg.hoist and not NOMATH
    HI = ITERS if HOIST else 1
    K_TAIL = ITERS * 32 != CH
    GLU = glu is not None
    if GLU and R % 2:
        raise UserError("gemv_w4a16_tma: the gated epilogue needs whole (gate, up) row pairs per warp")
    NY = N // 2 if GLU else N
    THREADS = (C + 1) * 32
    XSTEP = -(-(K // 8) // THREADS)

    def call(name, *args, return_type="void"):
        return T.cuda.func_call(name, *args, source_code=_SOURCES[name], return_type=return_type)

    def xslot(q):
        """The shared 16-byte slot of x's 16-byte piece q = 4c + j (chunk c's activations j*8 .. j*8 + 7): piece j
        of chunk c sits at j ^ ((c >> 1) & 3), so the 8 lanes of a quarter warp, reading piece j of 8 consecutive
        chunks, hit 8 different bank groups (unswizzled, the 64-byte stride put 4 of them on one)."""
        return q // 4 * 4 + T.bitwise_xor(q % 4, (q // 8) % 4)

    def full(s):  # byte offset of stage s's "filled" mbarrier; the "released" ones follow the S filled ones
        return s * 8

    def empty(s):
        return (S + s) * 8

    @T.prim_func(s_tir=True)
    def gemv(x: T.Buffer((1, K), "float16"), weight: T.Buffer((N, KW), "uint32"), scales: T.Buffer((N, NG), "float16"),
             zeros: T.Buffer((N, NG), "float16"), y: T.Buffer((1, NY), "float16")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        xu = T.decl_buffer((K // 2,), "uint32", data=x.data)
        for bx in T.thread_binding(NB, thread="blockIdx.x"):
            for ty in T.thread_binding(C + 1, thread="threadIdx.y"):
                for tx in T.thread_binding(32, thread="threadIdx.x"):
                    with T.sblock("gemv"):
                        T.reads()
                        T.writes()
                        sm = T.sblock_alloc_buffer((p["total"] // 4,), "uint32", scope="shared.dyn")
                        smh = T.decl_buffer((p["total"] // 2,), "float16", data=sm.data, scope="shared.dyn")
                        acc = T.sblock_alloc_buffer((R,), "float32", scope="local")
                        part = T.sblock_alloc_buffer((R,), "float32", scope="local")
                        h = T.sblock_alloc_buffer((R,), "uint32", scope="local")
                        wv = T.sblock_alloc_buffer((R, 4), "uint32", scope="local")
                        sc = T.sblock_alloc_buffer((R,), "float32", scope="local")
                        zz = T.sblock_alloc_buffer((R,), "uint32", scope="local")
                        hw = T.sblock_alloc_buffer((HI, R, 4), "uint32", scope="local")
                        hs = T.sblock_alloc_buffer((HI, R), "float32", scope="local")
                        hz = T.sblock_alloc_buffer((HI, R), "uint32", scope="local")
                        xw = T.sblock_alloc_buffer((4,), "uint32", scope="local")
                        xp = T.sblock_alloc_buffer((4,), "uint32", scope="local")
                        red = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        rv = T.sblock_alloc_buffer((R,), "float32", scope="local")
                        if ty == 0 and tx == 0:
                            for s in T.unroll(S):
                                T.evaluate(call("awq_mbar_init", sm.data, full(s), T.uint32(1)))
                                T.evaluate(call("awq_mbar_init", sm.data, empty(s), T.uint32(C)))
                            T.evaluate(call("awq_mbar_fence_init"))
                        for i in T.unroll(XSTEP):
                            if i * THREADS + ty * 32 + tx < K // 8:
                                for v in T.vectorized(4):
                                    sm[XOFF // 4 + xslot(i * THREADS + ty * 32 + tx) * 4 + v] = xu[(i * THREADS + ty * 32 + tx) * 4 + v]
                        T.tvm_storage_sync("shared")
                        if ty == C:
                            if tx == 0:
                                for i in T.serial(MAXT):
                                    if bx + i * NB < NT:
                                        if i >= S:
                                            T.evaluate(call("awq_mbar_wait", sm.data, empty(i % S),
                                                            (i // S + 1) % 2))
                                        T.evaluate(call(
                                            "awq_mbar_expect_tx", sm.data, full(i % S),
                                            0 if NOCOPY else T.min(RT, N - (bx + i * NB) * RT) * (K // 2 + 4 * NG)))
                                        if not NOCOPY:
                                            T.evaluate(call(
                                                "awq_bulk_g2s", sm.data, SOFF + (i % S) * STAGE,
                                                T.address_of(weight[(bx + i * NB) * RT, 0]),
                                                T.min(RT, N - (bx + i * NB) * RT) * (K // 2), full(i % S)))
                                            T.evaluate(call(
                                                "awq_bulk_g2s", sm.data, SOFF + (i % S) * STAGE + SREL,
                                                T.address_of(scales[(bx + i * NB) * RT, 0]),
                                                T.min(RT, N - (bx + i * NB) * RT) * (2 * NG), full(i % S)))
                                            T.evaluate(call(
                                                "awq_bulk_g2s", sm.data, SOFF + (i % S) * STAGE + ZREL,
                                                T.address_of(zeros[(bx + i * NB) * RT, 0]),
                                                T.min(RT, N - (bx + i * NB) * RT) * (2 * NG), full(i % S)))
                        else:
                            for i in T.serial(MAXT):
                                if bx + i * NB < NT:
                                    T.evaluate(call("awq_mbar_wait", sm.data, full(i % S), (i // S) % 2))
                                    for r in T.unroll(R):
                                        acc[r] = T.float32(0)
                                    if HOIST:
                                        for it in T.unroll(ITERS):
                                            if (not K_TAIL) or (it * 32 + tx < CH):
                                                for r in T.unroll(R):
                                                    for v in T.vectorized(4):
                                                        hw[it, r, v] = sm[(SOFF + (i % S) * STAGE) // 4 + (ty * R + r) * KW
                                                                          + (it * 32 + tx) * 4 + v]
                                                    hs[it, r] = T.Cast("float32", smh[(SOFF + (i % S) * STAGE + SREL) // 2
                                                                                      + (ty * R + r) * NG + (it * 32 + tx) // CPG])
                                                    hz[it, r] = (T.Cast("uint32", smh[(SOFF + (i % S) * STAGE + ZREL) // 2
                                                                                      + (ty * R + r) * NG + (it * 32 + tx) // CPG])
                                                                 + T.uint32(0x6400)) * T.uint32(0x00010001)
                                        # the stage is in registers: release it before computing
                                        T.evaluate(call("awq_syncwarp"))
                                        if tx == 0:
                                            T.evaluate(call("awq_mbar_arrive", sm.data, empty(i % S)))
                                        for it in T.unroll(ITERS):
                                            if (not K_TAIL) or (it * 32 + tx < CH):
                                                for r in T.unroll(R):
                                                    part[r] = T.float32(0)
                                                for j in T.unroll(4):
                                                    for v in T.vectorized(4):
                                                        xw[v] = sm[XOFF // 4 + xslot((it * 32 + tx) * 4 + j) * 4 + v]
                                                    for jj in T.unroll(4):
                                                        xp[jj] = T.call_pure_extern(
                                                            "uint32", "__byte_perm", xw[jj // 2], xw[jj // 2 + 2],
                                                            T.if_then_else(jj % 2 == 0, T.uint32(0x5410), T.uint32(0x7632)))
                                                    for r in T.unroll(R):
                                                        h[r] = T.cuda.func_call(
                                                            "awq_w4_fma8", hw[it, r, j], xp[0], xp[1], xp[2], xp[3], hz[it, r],
                                                            T.uint32(0), source_code=_H2_SOURCE, return_type="uint32")
                                                        part[r] = part[r] + T.cuda.func_call(
                                                            "awq_h2_sum", h[r], source_code=_H2SUM_SOURCE, return_type="float32")
                                                for r in T.unroll(R):
                                                    acc[r] = acc[r] + part[r] * hs[it, r]
                                    for it in T.serial(0 if (NOMATH or HOIST) else ITERS):
                                        if (not K_TAIL) or (it * 32 + tx < CH):
                                            for r in T.unroll(R):
                                                for v in T.vectorized(4):
                                                    wv[r, v] = sm[(SOFF + (i % S) * STAGE) // 4 + (ty * R + r) * KW
                                                                  + (it * 32 + tx) * 4 + v]
                                                sc[r] = T.Cast("float32", smh[(SOFF + (i % S) * STAGE + SREL) // 2
                                                                              + (ty * R + r) * NG + (it * 32 + tx) // CPG])
                                                zz[r] = (T.Cast("uint32", smh[(SOFF + (i % S) * STAGE + ZREL) // 2
                                                                              + (ty * R + r) * NG + (it * 32 + tx) // CPG])
                                                         + T.uint32(0x6400)) * T.uint32(0x00010001)
                                            for r in T.unroll(R):
                                                part[r] = T.float32(0)
                                            for j in T.unroll(4):
                                                for v in T.vectorized(4):
                                                    xw[v] = sm[XOFF // 4 + xslot((it * 32 + tx) * 4 + j) * 4 + v]
                                                for jj in T.unroll(4):
                                                    xp[jj] = T.call_pure_extern(
                                                        "uint32", "__byte_perm", xw[jj // 2], xw[jj // 2 + 2],
                                                        T.if_then_else(jj % 2 == 0, T.uint32(0x5410), T.uint32(0x7632)))
                                                for r in T.unroll(R):
                                                    h[r] = T.cuda.func_call(
                                                        "awq_w4_fma8", wv[r, j], xp[0], xp[1], xp[2], xp[3], zz[r],
                                                        T.uint32(0), source_code=_H2_SOURCE, return_type="uint32")
                                                    part[r] = part[r] + T.cuda.func_call(
                                                        "awq_h2_sum", h[r], source_code=_H2SUM_SOURCE, return_type="float32")
                                            for r in T.unroll(R):
                                                acc[r] = acc[r] + part[r] * sc[r]
                                    # this warp has read its rows of the stage: release it (the producer waits for all C)
                                    if not HOIST:
                                        T.evaluate(call("awq_syncwarp"))
                                        if tx == 0:
                                            T.evaluate(call("awq_mbar_arrive", sm.data, empty(i % S)))
                                    for r in T.unroll(R):
                                        red[0] = acc[r]
                                        for s in T.unroll(5):
                                            red[0] = red[0] + T.tvm_warp_shuffle_xor(
                                                T.tvm_warp_activemask(), red[0], T.shift_right(32, s + 1), 32, 32)
                                        rv[r] = red[0]
                                    if tx == 0:
                                        if GLU:
                                            for q in T.unroll(R // 2):
                                                if (bx + i * NB) * RT + ty * R + 2 * q < N:
                                                    y[0, ((bx + i * NB) * RT + ty * R + 2 * q) // 2] = T.Cast(
                                                        "float16", _activation(T, glu, rv[2 * q]) * rv[2 * q + 1])
                                        else:
                                            for r in T.unroll(R):
                                                if (bx + i * NB) * RT + ty * R + r < N:
                                                    y[0, (bx + i * NB) * RT + ty * R + r] = T.Cast("float16", rv[r])

    return gemv
