"""The second half of a decode layer and the next layer's qkv in one persistent kernel (CUDA, batch 1):

    s_mid = s + o_proj(a)                        (a: the attention's output, s: the residual stream)
    g     = act(gate(n1)) * up(n1),  n1 = rms_norm(s_mid) * gamma_post
    s_out = s_mid + down(g)
    qkv   = qkv_next(n2),            n2 = rms_norm(s_out) * gamma_in      (the next layer's input norm)

Why: at batch 1 each decode GEMV is a short kernel (the 7B's o_proj 5.7 us, down 12 us) that starts with
its loads' full latency and ends with a tail, and the norms between them are kernels of their own
(1.9 us each); the four GEMVs of a 7B layer move their bytes at ~2.2 TB/s where a copy moves 2.9. Here
one block per SM stays resident through all four matrices; a grid barrier (an atomic count and a
generation word, self-resetting, so a buffer of two zeros serves every call) separates the phases, and
each block stages the phase's input vector in shared memory (normalizing it where a norm comes first:
132 blocks repeat a 4096-element norm, not 1536-2752 as a norm prologue in every GEMV block would).

Work per phase: block b owns a contiguous range of ceil(N / blocks) rows (balanced across SMs, which the
barrier waits on); inside it the warps take tasks of `rows` rows round robin; a task is a warp's GEMV of
those rows over all of K (lanes along K, 16-byte chunks coalesced, the f16x2 inner step of
tvm_kernels/gemv_w4a16, warp-shuffle reduction).

All blocks must be resident at once (the barrier spins): the grid is the SM count and a block fits an
SM alone (`threads` x registers, shared memory max(H, I) halves).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tvm_kernels.errors import UserError
from tvm_kernels.gemv_w4a16 import (_H2_SOURCE, _H2SUM_SOURCE, _PACK_SOURCE, _activation, _drop_params, reference,
                                    reference_glu, reference_norm)
from tvm_kernels.layout import GROUP_SIZES
from tvm_kernels.targets import get_target


def reference_chain(a, s, o, gamma_post, gate_up, down, gamma_in, qkv, G: int, eps: float, act: str):
    """numpy: (s_mid, g, s_out, qkv) as the unfused kernels store them (fp16). Each matrix is a
    (weight, scales, zeros) triple in the kernel layout; gate_up's rows interleave gate and up."""
    f16 = np.float16
    s_mid = (reference(a, *o, G).astype(f16) + s.astype(f16)).astype(f16)
    n1 = reference_norm(s_mid, gamma_post, eps)
    g = reference_glu(n1, *gate_up, G, act).astype(f16)
    s_out = (reference(g, *down, G).astype(f16) + s_mid).astype(f16)
    n2 = reference_norm(s_out, gamma_in, eps)
    return s_mid, g, s_out, reference(n2, *qkv, G).astype(f16)


@dataclass(frozen=True)
class Phase:
    name: str
    N: int  # rows of the matrix
    K: int
    rows: int  # rows per warp task
    unroll: int  # 16-byte chunks per lane per load step


_BARRIER_SOURCE = r"""
__device__ __forceinline__ void awq_grid_sync(unsigned* bar, unsigned nblocks, unsigned reset) {
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    unsigned gen;
    asm volatile("ld.acquire.gpu.u32 %0, [%1];" : "=r"(gen) : "l"(bar + 1) : "memory");
    __threadfence();
    if (atomicAdd(bar, 1u) == nblocks - 1) {
      atomicExch(bar, 0u);
      for (int i = 0; i < 6; ++i) {
        if (reset & (1u << i)) atomicExch(bar + 2 + i, 0u);
      }
      __threadfence();
      atomicAdd(bar + 1, 1u);
    } else {
      unsigned now = gen;
      while (now == gen) {
        asm volatile("ld.acquire.gpu.u32 %0, [%1];" : "=r"(now) : "l"(bar + 1) : "memory");
      }
    }
    __threadfence();
  }
  __syncthreads();
}
"""


_TICKET_SOURCE = r"""
__device__ __forceinline__ int awq_ticket(unsigned* counter, int lane) {
  unsigned t = 0;
  if (lane == 0) t = atomicAdd(counter, 1u);
  return (int)__shfl_sync(0xffffffffu, t, 0);
}
"""
_TIMER_SOURCE = r"""
__device__ __forceinline__ unsigned long long awq_globaltimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t) :: "memory");
  return t;
}
"""
_SMID_SOURCE = r"""
__device__ __forceinline__ unsigned long long awq_smid() {
  unsigned r;
  asm volatile("mov.u32 %0, %smid;" : "=r"(r));
  return r;
}
"""


def gemv_chain(H: int, I: int, Q: int, G: int, eps: float, act: str, target, *, warps: int = 16,
               rows: tuple[int, int, int, int] = (1, 2, 1, 2), unroll: tuple[int, int, int, int] = (4, 4, 4, 4),
               timers: bool = False, dynamic: bool = True):
    """PrimFunc(a, s f16[1, H]; o (w u32[H, H/8], s, z f16[H, H/G]); gamma_post f16[H]; gate_up [2I, H/8 | H/G];
    down [H, I/8 | I/G]; gamma_in f16[H]; qkv [Q, H/8 | H/G]; bar u32[2] (zeros before the first call);
    outputs s_mid f16[1, H], g f16[1, I], s_out f16[1, H], qkv f16[1, Q])."""
    from tvm.script import tirx as T

    t = get_target(target)
    if not t.is_cuda:
        raise UserError(f"gemv_chain: a CUDA kernel; target {t.name}")
    if G not in GROUP_SIZES or H % G or I % G or H % 8 or I % 8:
        raise UserError(f"gemv_chain: H={H}, I={I} must be multiples of the group size {G} (one of {GROUP_SIZES})")
    NB, W = t.num_sms, warps
    THREADS = 32 * W
    phases = [Phase("o", H, H, rows[0], unroll[0]), Phase("gate_up", 2 * I, H, rows[1], unroll[1]),
              Phase("down", H, I, rows[2], unroll[2]), Phase("qkv", Q, H, rows[3], unroll[3])]
    if rows[1] % 2:
        raise UserError("gemv_chain: gate_up's tasks need whole (gate, up) row pairs")
    RMAX = max(p.rows for p in phases)
    UMAX = max(p.unroll for p in phases)
    XW = max(H, I) // 2  # shared words of the staged input vector
    inv_h, eps_ = T.float32(1.0 / H), T.float32(eps)
    CPG = G // 32

    def plan(p: Phase):
        rpb = -(-p.N // (NB * p.rows)) * p.rows  # rows a block owns
        tpb = rpb // p.rows
        ch = p.K // 32
        iters = -(-ch // 32)
        outer = -(-iters // p.unroll)
        return rpb, tpb, -(-tpb // W), ch, outer, outer * p.unroll * 32 != ch

    def make_phase(p: Phase, residual: bool, counter: int):
        RPB, TPB, TW, CH, OUTER, K_TAIL = plan(p)
        R, U, N = p.rows, p.unroll, p.N
        NT = -(-N // R)  # tasks of the phase (dynamic)
        GLU = p.name == "gate_up"

        def chunk(o, u, tx):
            return (o * U + u) * 32 + tx

        @T.macro
        def task(base, tx, weight, scales, zeros, xs, r_in, y, acc, part, h, wv, sc, zz, xw, xp, red, rv):
            """rows base .. base + R - 1 over all of K (loads clamp rows to N - 1, stores skip them)"""
            for r in T.unroll(R):
                acc[r] = T.float32(0)
            for o in T.serial(OUTER):
                for u in T.unroll(U):
                    for r in T.unroll(R):
                        if (not K_TAIL) or (chunk(o, u, tx) < CH):
                            for v in T.vectorized(4):
                                wv[u, r, v] = weight[T.min(base + r, N - 1), chunk(o, u, tx) * 4 + v]
                            sc[u, r] = T.Cast("float32", scales[T.min(base + r, N - 1), chunk(o, u, tx) // CPG])
                            zz[u, r] = (T.Cast("uint32", zeros[T.min(base + r, N - 1), chunk(o, u, tx) // CPG])
                                        + T.uint32(0x6400)) * T.uint32(0x00010001)
                for u in T.unroll(U):
                    if (not K_TAIL) or (chunk(o, u, tx) < CH):
                        for r in T.unroll(R):
                            part[r] = T.float32(0)
                        for j in T.unroll(4):
                            for v in T.vectorized(4):
                                xw[v] = xs[chunk(o, u, tx) * 16 + j * 4 + v]
                            for jj in T.unroll(4):
                                xp[jj] = T.call_pure_extern(
                                    "uint32", "__byte_perm", xw[jj // 2], xw[jj // 2 + 2],
                                    T.if_then_else(jj % 2 == 0, T.uint32(0x5410), T.uint32(0x7632)))
                            for r in T.unroll(R):
                                h[r] = T.cuda.func_call(
                                    "awq_w4_fma8", wv[u, r, j], xp[0], xp[1], xp[2], xp[3], zz[u, r], T.uint32(0),
                                    source_code=_H2_SOURCE, return_type="uint32")
                                part[r] = part[r] + T.cuda.func_call(
                                    "awq_h2_sum", h[r], source_code=_H2SUM_SOURCE, return_type="float32")
                        for r in T.unroll(R):
                            acc[r] = acc[r] + part[r] * sc[u, r]
            for r in T.unroll(R):
                red[0] = acc[r]
                for s in T.unroll(5):
                    red[0] = red[0] + T.tvm_warp_shuffle_xor(
                        T.tvm_warp_activemask(), red[0], T.shift_right(32, s + 1), 32, 32)
                rv[r] = red[0]
            if tx == 0:
                if GLU:
                    for q in T.unroll(R // 2):
                        if base + 2 * q < N:
                            y[0, (base + 2 * q) // 2] = T.Cast("float16", _activation(T, act, rv[2 * q]) * rv[2 * q + 1])
                else:
                    for r in T.unroll(R):
                        if base + r < N:
                            if residual:
                                y[0, base + r] = T.Cast("float16", rv[r]) + r_in[0, base + r]
                            else:
                                y[0, base + r] = T.Cast("float16", rv[r])

        @T.macro
        def run(bx, w, tx, bar, tk, weight, scales, zeros, xs, r_in, y, acc, part, h, wv, sc, zz, xw, xp, red, rv):
            if dynamic:
                # warps take the next task from a counter: SMs draw unequal shares of the memory's bandwidth
                # (a static split measured 12-15 us between the first and last block to finish a phase)
                tk[0] = T.cuda.func_call("awq_ticket", T.address_of(bar[2 + counter]), tx,
                                         source_code=_TICKET_SOURCE, return_type="int32")
                while tk[0] < NT:
                    tk[1] = T.cuda.func_call("awq_ticket", T.address_of(bar[2 + counter]), tx,
                                             source_code=_TICKET_SOURCE, return_type="int32")
                    task(tk[0] * R, tx, weight, scales, zeros, xs, r_in, y, acc, part, h, wv, sc, zz, xw, xp, red, rv)
                    tk[0] = tk[1]
            else:
                for i in T.serial(TW):
                    if i * W + w < TPB and bx * RPB + (i * W + w) * R < N:
                        task(bx * RPB + (i * W + w) * R, tx, weight, scales, zeros, xs, r_in, y, acc, part, h, wv, sc,
                             zz, xw, xp, red, rv)

        return run

    run_o, run_gu, run_d, run_q = (make_phase(p, res, c) for c, (p, res) in enumerate(zip(phases, (True, False, True, False))))

    def make_stage(K: int, norm: bool):
        """The phase's input vector (K halves) into shared words xs; with `norm`, rms_norm(v) * gamma."""
        NSTEP = -(-(K // 8) // THREADS)

        def tid(w, tx):
            return w * 32 + tx

        @T.macro
        def stage(w, tx, src, gamma, xs, xv, gv, ss, wsum):
            ss[0] = T.float32(0)
            for i in T.unroll(NSTEP):
                if i * THREADS + tid(w, tx) < K // 8:
                    for v in T.vectorized(8):
                        xv[i, v] = src[0, (i * THREADS + tid(w, tx)) * 8 + v]
                    if norm:
                        for v in T.unroll(8):
                            ss[0] = ss[0] + T.Cast("float32", xv[i, v]) * T.Cast("float32", xv[i, v])
            if norm:
                for s in T.unroll(5):
                    ss[0] = ss[0] + T.tvm_warp_shuffle_xor(T.tvm_warp_activemask(), ss[0], T.shift_right(32, s + 1), 32, 32)
                if tx == 0:
                    wsum[w] = ss[0]
                T.tvm_storage_sync("shared")
                ss[0] = wsum[0]
                for k in T.unroll(1, W):
                    ss[0] = ss[0] + wsum[k]
                ss[0] = T.rsqrt(ss[0] * inv_h + eps_)
            for i in T.unroll(NSTEP):
                if i * THREADS + tid(w, tx) < K // 8:
                    if norm:
                        for v in T.vectorized(8):
                            gv[v] = gamma[(i * THREADS + tid(w, tx)) * 8 + v]
                        for e in T.unroll(4):
                            xs[(i * THREADS + tid(w, tx)) * 4 + e] = T.cuda.func_call(
                                "awq_pack_h2",
                                T.Cast("float32", xv[i, 2 * e]) * ss[0] * T.Cast("float32", gv[2 * e]),
                                T.Cast("float32", xv[i, 2 * e + 1]) * ss[0] * T.Cast("float32", gv[2 * e + 1]),
                                source_code=_PACK_SOURCE, return_type="uint32")
                    else:  # fp16 -> fp32 -> fp16 is exact
                        for e in T.unroll(4):
                            xs[(i * THREADS + tid(w, tx)) * 4 + e] = T.cuda.func_call(
                                "awq_pack_h2", T.Cast("float32", xv[i, 2 * e]), T.Cast("float32", xv[i, 2 * e + 1]),
                                source_code=_PACK_SOURCE, return_type="uint32")
            T.tvm_storage_sync("shared")

        return stage, NSTEP

    stage_a, NS_A = make_stage(H, False)
    stage_n, NS_N = make_stage(H, True)
    stage_g, NS_G = make_stage(I, False)
    NSTEP = max(NS_A, NS_N, NS_G)

    @T.macro
    def stamp(ts, bx, w, tx, k):  # timers: this block's %globaltimer once all its warps got here
        if timers:
            T.tvm_storage_sync("shared")
            if w == 0 and tx == 0:
                ts[bx, k] = T.cuda.func_call("awq_globaltimer", source_code=_TIMER_SOURCE, return_type="uint64")

    @T.macro
    def grid_sync(bar, reset):  # reset: the task counters (bits) that no block reads any more
        T.evaluate(T.cuda.func_call("awq_grid_sync", T.address_of(bar[0]), T.uint32(NB), T.uint32(reset),
                                    source_code=_BARRIER_SOURCE, return_type="void"))

    @T.prim_func(s_tir=True)
    def chain(
        a: T.Buffer((1, H), "float16"), s: T.Buffer((1, H), "float16"),
        wo: T.Buffer((H, H // 8), "uint32"), so: T.Buffer((H, H // G), "float16"), zo: T.Buffer((H, H // G), "float16"),
        gamma_post: T.Buffer((H,), "float16"),
        wgu: T.Buffer((2 * I, H // 8), "uint32"), sgu: T.Buffer((2 * I, H // G), "float16"),
        zgu: T.Buffer((2 * I, H // G), "float16"),
        wd: T.Buffer((H, I // 8), "uint32"), sd: T.Buffer((H, I // G), "float16"), zd: T.Buffer((H, I // G), "float16"),
        gamma_in: T.Buffer((H,), "float16"),
        wq: T.Buffer((Q, H // 8), "uint32"), sq: T.Buffer((Q, H // G), "float16"), zq: T.Buffer((Q, H // G), "float16"),
        bar: T.Buffer((8,), "uint32"),
        s_mid: T.Buffer((1, H), "float16"), g: T.Buffer((1, I), "float16"), s_out: T.Buffer((1, H), "float16"),
        qkv: T.Buffer((1, Q), "float16"),
        ts: T.Buffer((NB, 13), "uint64"),  # timers only (dropped otherwise)
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for bx in T.thread_binding(NB, thread="blockIdx.x"):
            for w in T.thread_binding(W, thread="threadIdx.y"):
                for tx in T.thread_binding(32, thread="threadIdx.x"):
                    with T.sblock("chain"):
                        acc = T.sblock_alloc_buffer((RMAX,), "float32", scope="local")
                        part = T.sblock_alloc_buffer((RMAX,), "float32", scope="local")
                        hh = T.sblock_alloc_buffer((RMAX,), "uint32", scope="local")
                        wv = T.sblock_alloc_buffer((UMAX, RMAX, 4), "uint32", scope="local")
                        sc = T.sblock_alloc_buffer((UMAX, RMAX), "float32", scope="local")
                        zz = T.sblock_alloc_buffer((UMAX, RMAX), "uint32", scope="local")
                        xw = T.sblock_alloc_buffer((4,), "uint32", scope="local")
                        xp = T.sblock_alloc_buffer((4,), "uint32", scope="local")
                        red = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        rv = T.sblock_alloc_buffer((RMAX,), "float32", scope="local")
                        tk = T.sblock_alloc_buffer((2,), "int32", scope="local")
                        xv = T.sblock_alloc_buffer((NSTEP, 8), "float16", scope="local")
                        gv = T.sblock_alloc_buffer((8,), "float16", scope="local")
                        ss = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        wsum = T.sblock_alloc_buffer((W,), "float32", scope="shared")
                        xs = T.sblock_alloc_buffer((XW,), "uint32", scope="shared")
                        stamp(ts, bx, w, tx, 0)
                        stage_a(w, tx, a, gamma_post, xs, xv, gv, ss, wsum)
                        stamp(ts, bx, w, tx, 1)
                        run_o(bx, w, tx, bar, tk, wo, so, zo, xs, s, s_mid, acc, part, hh, wv, sc, zz, xw, xp, red, rv)
                        stamp(ts, bx, w, tx, 2)
                        grid_sync(bar, 0b1001)  # o's counter, and the last call's qkv's
                        stamp(ts, bx, w, tx, 3)
                        stage_n(w, tx, s_mid, gamma_post, xs, xv, gv, ss, wsum)
                        stamp(ts, bx, w, tx, 4)
                        run_gu(bx, w, tx, bar, tk, wgu, sgu, zgu, xs, s, g, acc, part, hh, wv, sc, zz, xw, xp, red, rv)
                        stamp(ts, bx, w, tx, 5)
                        grid_sync(bar, 0b0010)
                        stamp(ts, bx, w, tx, 6)
                        stage_g(w, tx, g, gamma_post, xs, xv, gv, ss, wsum)
                        stamp(ts, bx, w, tx, 7)
                        run_d(bx, w, tx, bar, tk, wd, sd, zd, xs, s_mid, s_out, acc, part, hh, wv, sc, zz, xw, xp, red, rv)
                        stamp(ts, bx, w, tx, 8)
                        grid_sync(bar, 0b0100)
                        stamp(ts, bx, w, tx, 9)
                        stage_n(w, tx, s_out, gamma_in, xs, xv, gv, ss, wsum)
                        stamp(ts, bx, w, tx, 10)
                        run_q(bx, w, tx, bar, tk, wq, sq, zq, xs, s, qkv, acc, part, hh, wv, sc, zz, xw, xp, red, rv)
                        stamp(ts, bx, w, tx, 11)
                        if timers:
                            if w == 0 and tx == 0:
                                ts[bx, 12] = T.cuda.func_call("awq_smid", source_code=_SMID_SOURCE, return_type="uint64")

    return _drop_params(chain, {"ts": timers})
