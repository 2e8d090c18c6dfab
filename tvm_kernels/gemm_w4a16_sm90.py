"""Prefill GEMM y[M, N] = x[M, K] @ dequant(W)^T for Hopper (sm_90a: H100 / H200) on wgmma, INT4 weights
in the kernel layout (tvm_kernels/layout.py), FP16 activations and output, FP32 accumulation.

Why a second GEMM for one architecture: the portable kernel (gemm_w4a16.py) issues mma.sync, which on
Hopper stays at 0.25-0.4x of cuBLAS, and even with plain fp16 weights at 0.35-0.44x: cuBLAS runs the
asynchronous warpgroup MMA (wgmma) that only sm_90a has. This kernel is that main loop:
- The problem is computed transposed, y^T = W x^T, so the dequantized weights are wgmma's A operand taken
  from *registers*: each thread unpacks exactly the nibbles its A fragment holds (byte t of a packed word
  holds k = 2t, 2t+1 of an 8-wide slice: one byte_perm, one lop3 and two half2 ops per two weights, the
  fp16 1024 + q trick of the portable kernel), and no dequantized tile goes through shared memory.
- The activations are wgmma's B operand in shared memory, in the 128-byte swizzled K-major layout, filled
  by a cp.async pipeline (`stages` deep) together with the packed weight tile. wgmma is asynchronous: the
  dequantize of step k + 1 runs while the tensor cores work on step k (one group in flight).
- A block is `warpgroups` x 64 weight rows by `tokens` (64, 128 or 256) tokens. M is symbolic: the
  PrimFunc launches one of up to three tilings chosen on the host by M (TINY / SMALL / LARGE below);
  padding tokens are zero-filled by the predicated copies and never stored; the output goes out through
  shared memory in 16-byte runs.
- H100 (benchmarks/results/gemm_sm90_h100.json): one Llama-2-7B layer's four GEMMs at M = 2048 run at
  0.60-0.65x cuBLAS FP16 over six runs (1.8x the portable kernel); without the dequantize the same loop
  reaches ~0.71x.
The PTX (wgmma, cp.async, proxy fences) sits in small inline-asm helpers that the TIR calls through
T.cuda.func_call; the loop nest, tiling, pipeline and addressing are TIR. Only sm_90a runs it: every
other target, the Orin included, keeps the portable kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

from tvm_kernels.errors import UserError
# the same computation as the portable kernel's, so the same numpy reference
from tvm_kernels.gemm_w4a16 import reference  # noqa: F401
from tvm_kernels.layout import GROUP_SIZES

BK = 64  # k per pipeline stage (four k16 wgmma steps)
W_ROW = 48  # bytes between packed weight rows in shared memory (32 used; the padding spreads the banks)
MAX_SMEM = 227 * 1024  # H100 / H200 shared memory per block (opt-in)


def _shape_fits(N: int, K: int, group_size: int) -> bool:
    return group_size in GROUP_SIZES and K % group_size == 0 and K % BK == 0 and N % 16 == 0


def supports(N: int, K: int, group_size: int, arch: str | None) -> bool:
    """wgmma needs sm_90a (H100 / H200 / GH200 built with the `a` suffix); the tiling needs these shapes."""
    return arch == "sm_90a" and _shape_fits(N, K, group_size)


def _wgmma_asm(n: int) -> str:
    regs = ", ".join(f"%{i}" for i in range(n // 2))
    a = ", ".join(f"%{n // 2 + i}" for i in range(4))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(n // 2))
    return (
        f"__device__ __forceinline__ void awq_wgmma_m64n{n}k16(float* d, const unsigned* a, unsigned long long desc) {{\n"
        f'  asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{n // 2 + 5}, 0;\\n"\n'
        f'    "wgmma.mma_async.sync.aligned.m64n{n}k16.f32.f16.f16 {{{regs}}}, {{{a}}}, %{n // 2 + 4}, p, 1, 1, 0;\\n}}\\n"\n'
        f'    : {outs}\n'
        f'    : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(1));\n'
        "}\n"
    )


_HELPERS = r"""
__device__ __forceinline__ void awq_cp_async16(const half* smem, int off, const void* gmem, int valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :: "r"(static_cast<unsigned>(__cvta_generic_to_shared(smem)) + off), "l"(gmem), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void awq_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void awq_cp_async_wait(int n) {
  if (n <= 0) asm volatile("cp.async.wait_group 0;\n" ::: "memory");
  else if (n == 1) asm volatile("cp.async.wait_group 1;\n" ::: "memory");
  else if (n == 2) asm volatile("cp.async.wait_group 2;\n" ::: "memory");
  else asm volatile("cp.async.wait_group 3;\n" ::: "memory");
}
// cp.async writes through the generic proxy, wgmma reads through the async proxy
__device__ __forceinline__ void awq_fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void awq_wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void awq_wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void awq_wgmma_wait(int n) {
  if (n <= 0) asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  else asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
}
// keeps the compiler from reading or reusing accumulator registers across an asynchronous wgmma
__device__ __forceinline__ void awq_acc_fence(float* d, int n) {
  #pragma unroll
  for (int i = 0; i < n; ++i) asm volatile("" : "+f"(d[i]) :: "memory");
}
// wgmma descriptor of a K-major tile in the 128-byte swizzle: rows of 128 bytes, 8-row groups 1024 bytes
// apart (the stride field), the leading-dimension field unused by this swizzle (1, i.e. 16 bytes)
__device__ __forceinline__ unsigned long long awq_desc(const half* smem, int off) {
  return (static_cast<unsigned long long>(((static_cast<unsigned>(__cvta_generic_to_shared(smem)) + off) & 0x3FFFF) >> 4))
       | (1ull << 16) | (static_cast<unsigned long long>(1024 >> 4) << 32) | (1ull << 62);
}
// byte t of w holds two weights q0 (low nibble), q1: -> half2((q0 - z) * s, (q1 - z) * s)
__device__ __forceinline__ unsigned awq_deq2(unsigned w, unsigned sel, unsigned zf, unsigned s2) {
  unsigned u = __byte_perm(w, 0u, sel);          // byte t at bytes 0 and 2
  unsigned h = (u & 0x00F0000Fu) | 0x64006400u;  // half2(1024 + q0, 1024 + 16 q1)
  const unsigned one_sixteenth = 0x2C003C00u;    // half2(1, 1/16)
  unsigned v;
  // (1024 + q0) - (1024 + z) and (1024 + 16 q1) / 16 - (64 + z): exact small integers, then one rounding
  asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(v) : "r"(h), "r"(one_sixteenth), "r"(zf));
  asm("mul.rn.f16x2 %0, %0, %1;\n" : "+r"(v) : "r"(s2));
  return v;
}
// scale / zero of weight row n for the two 32-wide halves of a stage -> sz[4 * half + 2 * row + {0: s2, 1: zf}]
__device__ __forceinline__ void awq_load_sz(unsigned* sz, const half* scales, const half* zeros, int n0, int N,
                                            int groups, int ko, int gsize) {
  #pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    if (hh == 1 && gsize >= 64) {  // one group covers the whole stage
      sz[4] = sz[0]; sz[5] = sz[1]; sz[6] = sz[2]; sz[7] = sz[3];
      break;
    }
    int g = (ko * 64 + hh * 32) / gsize;
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
      int n = n0 + 8 * r;
      half s = __float2half(0.f), z = __float2half(0.f);
      if (n < N) { s = scales[(long long)n * groups + g]; z = zeros[(long long)n * groups + g]; }
      half2 s2 = __halves2half2(s, s);
      half2 zf = __halves2half2(__hneg(__hadd(z, __float2half(1024.f))), __hneg(__hadd(z, __float2half(64.f))));
      sz[4 * hh + 2 * r] = *reinterpret_cast<unsigned*>(&s2);
      sz[4 * hh + 2 * r + 1] = *reinterpret_cast<unsigned*>(&zf);
    }
  }
}
// this thread's A fragments for the four k16 steps of a stage: rows r0 and r0 + 8 of the packed tile
__device__ __forceinline__ void awq_dequant_stage(unsigned* a, const half* smem, int off, int r0, int t, const unsigned* sz) {
  const unsigned* wtile = reinterpret_cast<const unsigned*>(reinterpret_cast<const char*>(smem) + off);
  const unsigned sel = 0x4040u | t | (t << 8);
  // rows are W_ROW = 48 bytes apart (32 used): the 8 rows a warp reads hit 8 different bank groups
  uint4 p0 = reinterpret_cast<const uint4*>(wtile + r0 * 12)[0];
  uint4 p1 = reinterpret_cast<const uint4*>(wtile + r0 * 12)[1];
  uint4 q0 = reinterpret_cast<const uint4*>(wtile + (r0 + 8) * 12)[0];
  uint4 q1 = reinterpret_cast<const uint4*>(wtile + (r0 + 8) * 12)[1];
  unsigned w0[8] = {p0.x, p0.y, p0.z, p0.w, p1.x, p1.y, p1.z, p1.w};
  unsigned w1[8] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w};
  #pragma unroll
  for (int s = 0; s < 4; ++s) {
    const unsigned* h = sz + 4 * (s / 2);
    a[4 * s + 0] = awq_deq2(w0[2 * s], sel, h[1], h[0]);
    a[4 * s + 1] = awq_deq2(w1[2 * s], sel, h[3], h[2]);
    a[4 * s + 2] = awq_deq2(w0[2 * s + 1], sel, h[1], h[0]);
    a[4 * s + 3] = awq_deq2(w1[2 * s + 1], sel, h[3], h[2]);
  }
}
// timing aid only (config dequant=False): the packed words as fragments, no dequantize
__device__ __forceinline__ void awq_raw_stage(unsigned* a, const half* smem, int off, int r0, int t, const unsigned* sz) {
  const uint4* w = reinterpret_cast<const uint4*>(reinterpret_cast<const char*>(smem) + off);
  uint4 p0 = w[r0 * 3], p1 = w[r0 * 3 + 1], q0 = w[r0 * 3 + 24], q1 = w[r0 * 3 + 25];
  unsigned v[16] = {p0.x, p0.y, p0.z, p0.w, p1.x, p1.y, p1.z, p1.w, q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w};
  #pragma unroll
  for (int i = 0; i < 16; ++i) a[i] = v[i] & 0x3BFF3BFFu;
}
""" + _wgmma_asm(64) + _wgmma_asm(128) + _wgmma_asm(256)


def _split_helpers(src: str) -> dict:
    """name -> source of that helper alone: TVM emits a func_call's source once per function name."""
    out, chunk, depth = {}, [], 0
    for line in src.strip().splitlines(keepends=True):
        chunk.append(line)
        depth += line.count("{") - line.count("}")
        if depth == 0 and "__device__" in line + "".join(chunk) and "}" in line:
            text = "".join(chunk)
            out[text[text.index("__device__"):].split("(")[0].split()[-1]] = text
            chunk = []
    # the one helper that calls another carries it along
    out["awq_dequant_stage"] = out.pop("awq_deq2") + out["awq_dequant_stage"]
    return out


_SOURCES = _split_helpers(_HELPERS)


@dataclass(frozen=True)
class Sm90Config:
    warpgroups: int = 2  # 64 weight rows each: the block's weight tile is 64 * warpgroups rows
    tokens: int = 128  # wgmma n: tokens per block (64, 128 or 256)
    stages: int = 4
    dequant: bool = True  # False: a timing aid that feeds the packed words as fragments (wrong results)

    @property
    def threads(self) -> int:
        return 128 * self.warpgroups

    @property
    def rows(self) -> int:
        return 64 * self.warpgroups

    def stage_bytes(self) -> int:
        return self.tokens * BK * 2 + self.rows * W_ROW

    def smem_bytes(self) -> int:
        # the output tile is staged through the same memory after the main loop
        return max(self.stages * self.stage_bytes(), self.tokens * (self.rows + 8) * 2)


# Measured (H100, benchmarks/results/gemm_sm90_h100.json, each tiling alone on the 7B shapes): 128 x 128 tiles
# with 4 stages (two blocks per SM, one's prologue and epilogue under the other's main loop) win while the
# grid is small (qkv at M = 512: 138 us vs 149 for LARGE); 128 rows x 256 tokens (one block per SM, 128
# accumulators a thread) move fewer activation bytes per FLOP and win once every SM gets about two of them
# (M = 2048: the 7B layer 1956 us vs 2059). When even the 128 x 128 tiles would occupy at most half the SMs
# (o and down, 32 column tiles, at M <= 256), one warpgroup of 64 rows x 64 tokens wins: o 29 / 34 us vs
# 49 / 49 at M = 128 / 256, down 86 / 103 vs 134 / 135 (it loses once the grid is full: o at 512, 57 vs 50).
TINY = Sm90Config(1, 64, 4)
SMALL = Sm90Config(2, 128, 4)
LARGE = Sm90Config(2, 256, 5)


def large_threshold(N: int, num_sms: int) -> int:
    """Fewest tokens at which the LARGE tiles number about two per SM (1.9: o / down at M = 2048 have 256
    tiles on 132 SMs and already win)."""
    col_tiles = -(-N // LARGE.rows)
    return LARGE.tokens * -(-(19 * max(num_sms, 1)) // (10 * col_tiles))


def small_threshold(N: int, num_sms: int) -> int:
    """Fewest tokens at which the SMALL tiles occupy more than half the SMs (below: TINY)."""
    col_tiles = -(-N // SMALL.rows)
    return SMALL.tokens * (max(num_sms, 1) // (2 * col_tiles)) + 1


def default_tilings(N: int, num_sms: int) -> list[tuple[int, Sm90Config]]:
    small = small_threshold(N, num_sms)
    out = [(0, TINY), (small, SMALL)] if small > 1 else [(0, SMALL)]
    return out + [(max(large_threshold(N, num_sms), small + 1), LARGE)]


def _check(N: int, K: int, group_size: int, cfg: Sm90Config) -> None:
    if not _shape_fits(N, K, group_size):
        raise UserError(f"gemm_w4a16_sm90: needs K % {BK} == 0, N % 16 == 0 and a group size in {GROUP_SIZES} "
                        f"(N={N}, K={K}, group {group_size})")
    if cfg.tokens not in (64, 128, 256) or not 3 <= cfg.stages <= 6 or cfg.smem_bytes() > MAX_SMEM or cfg.warpgroups not in (1, 2, 3, 4):
        raise UserError(f"gemm_w4a16_sm90: config {cfg} does not fit (tokens 64/128/256, 3-6 stages, <= 4 warpgroups, "
                        f"{MAX_SMEM} B of shared memory)")


def _kernel(N: int, K: int, G: int, cfg: Sm90Config):
    """A T.macro launching the kernel for one configuration (the PrimFunc picks one per call by M)."""
    from tvm.script import tirx as T

    _check(N, K, G, cfg)
    KW, NG, KT = K // 8, K // G, K // BK
    TH, BN, BM, S = cfg.threads, cfg.rows, cfg.tokens, cfg.stages
    # all activation tiles first (each 1024-byte aligned, as the 128B swizzle requires), then the weight tiles
    XS, WS = BM * BK * 2, BN * W_ROW
    WB = S * XS
    XC = (BM * 8 + TH - 1) // TH  # 16-byte activation chunks per thread per stage
    NB = (N + BN - 1) // BN
    ACC = BM // 2
    OS = BN + 8  # row stride (halves) of the output tile staged in shared memory
    frag = "awq_dequant_stage" if cfg.dequant else "awq_raw_stage"
    wgmma = f"awq_wgmma_m64n{BM}k16"

    def call(name, *args, return_type="void"):
        return T.cuda.func_call(name, *args, source_code=_SOURCES[name], return_type=return_type)

    # The activation tile: `BM` rows (tokens) of BK = 64 halves = 128 bytes, in wgmma's 128-byte swizzle: the
    # 16-byte chunk c of row m sits at chunk c ^ (m % 8), so the 8 threads that copy one row's 128 contiguous
    # bytes also write 8 different bank groups (with the plain core-matrix layout each 8 threads read one 16-byte
    # chunk of 8 rows, half cache lines; it was clearly slower in an exploratory sweep whose code is not kept).
    # The k16 slice s of every row starts 32 bytes on.
    def x_off(m, c):
        return m * 128 + T.bitwise_xor(c, m % 8) * 16

    @T.macro
    def copy_stage(sm, x, w, M, kk, bx, m_base, tx):
        # stage kk -> slot kk % S: the activation tile, then the packed weights (row tx // 2, half tx % 2).
        # Shared memory goes to the helpers as base + byte offset: TVM's sync planner would otherwise put a
        # block barrier between every copy and fragment read; the kernel places the two barriers it needs.
        for c in T.unroll(XC):
            q: T.let[T.int32] = c * TH + tx
            if q < BM * 8:
                call("awq_cp_async16", sm.data, kk % S * XS + x_off(q // 8, q % 8),
                     x.access_ptr("r", offset=T.min(m_base + q // 8, M - 1) * K + kk * BK + q % 8 * 8),
                     T.Cast("int32", m_base + q // 8 < M))
        call("awq_cp_async16", sm.data, WB + kk % S * WS + tx // 2 * W_ROW + tx % 2 * 16,
             w.access_ptr("r", offset=T.min(bx * BN + tx // 2, N - 1) * KW + kk * 8 + tx % 2 * 4),
             T.Cast("int32", bx * BN + tx // 2 < N))

    @T.macro
    def mma_step(sm, acc, f, sz, slot, r0, lane):
        call(frag, f.data, sm.data, WB + slot * WS, r0, lane % 4, sz.data)
        call("awq_wgmma_fence")
        desc: T.let[T.uint64] = call("awq_desc", sm.data, slot * XS, return_type="uint64")
        for s in T.unroll(4):  # slice s starts 32 bytes on: +2 in the descriptor's 16-byte address field
            call(wgmma, acc.data, f.access_ptr("r", offset=4 * s), desc + T.uint64(2 * s))

    @T.macro
    def launch(x, w, sc, ze, y, M):
        for bx in T.thread_binding(NB, thread="blockIdx.x"):
            for by in T.thread_binding((M + BM - 1) // BM, thread="blockIdx.y"):
                for tx in T.thread_binding(TH, thread="threadIdx.x"):
                    with T.sblock("gemm"):
                        T.reads()
                        T.writes()
                        sm = T.sblock_alloc_buffer((cfg.smem_bytes() // 2,), "float16", scope="shared.dyn")
                        acc = T.sblock_alloc_buffer((ACC,), "float32", scope="local")
                        fa = T.sblock_alloc_buffer((16,), "uint32", scope="local")
                        fb = T.sblock_alloc_buffer((16,), "uint32", scope="local")
                        sz = T.sblock_alloc_buffer((8,), "uint32", scope="local")
                        szn = T.sblock_alloc_buffer((8,), "uint32", scope="local")
                        lane: T.let[T.int32] = tx % 32
                        r0: T.let[T.int32] = tx // 32 * 16 + lane // 4  # this thread's weight rows r0, r0 + 8
                        n0: T.let[T.int32] = bx * BN + r0
                        m_base: T.let[T.int64] = T.Cast("int64", by) * BM
                        for i in T.unroll(ACC):
                            acc[i] = T.float32(0)
                        call("awq_load_sz", szn.data, sc.data, ze.data, n0, N, NG, 0, G)
                        for kk in T.serial(S - 2):
                            copy_stage(sm, x, w, M, kk, bx, m_base, tx)
                            call("awq_cp_async_commit")
                        for ko in T.serial(KT):
                            for i in T.unroll(8):
                                sz[i] = szn[i]
                            # the next step's scales (when its group starts) are in flight during this one
                            if ko + 1 < KT and (G < BK or (ko + 1) * BK % G == 0):
                                call("awq_load_sz", szn.data, sc.data, ze.data, n0, N, NG, ko + 1, G)
                            call("awq_cp_async_wait", S - 3)
                            call("awq_fence_proxy_async")
                            T.tvm_storage_sync("shared")
                            # every warpgroup has retired its wgmma of step ko - 2: that slot takes step ko + S - 2
                            if ko + S - 2 < KT:
                                copy_stage(sm, x, w, M, ko + S - 2, bx, m_base, tx)
                            call("awq_cp_async_commit")
                            # two fragment sets: this step's dequantize never writes what wgmma ko - 1 still reads
                            if ko % 2 == 0:
                                mma_step(sm, acc, fa, sz, ko % S, r0, lane)
                            else:
                                mma_step(sm, acc, fb, sz, ko % S, r0, lane)
                            call("awq_wgmma_commit")
                            call("awq_wgmma_wait", 1)
                        call("awq_wgmma_wait", 0)
                        call("awq_acc_fence", acc.data, ACC)
                        # epilogue through shared memory (free now), so y is written in 16-byte runs along N.
                        # acc[4j + i]: weight row r0 + 8 (i // 2), token 8j + 2 (lane % 4) + i % 2
                        T.tvm_storage_sync("shared")
                        for j in T.unroll(BM // 8):
                            for i in T.unroll(4):
                                sm[(j * 8 + lane % 4 * 2 + i % 2) * OS + r0 + i // 2 * 8] = T.Cast("float16", acc[j * 4 + i])
                        T.tvm_storage_sync("shared")
                        for c in T.unroll(BM * BN // 8 // TH):
                            q: T.let[T.int32] = c * TH + tx
                            tl: T.let[T.int32] = q // (BN // 8)
                            nc: T.let[T.int32] = q % (BN // 8) * 8
                            if m_base + tl < M and bx * BN + nc < N:
                                for v in T.vectorized(8):
                                    y[m_base + tl, bx * BN + nc + v] = sm[tl * OS + nc + v]

    return launch


def gemm_w4a16_sm90(N: int, K: int, group_size: int, tilings: list[tuple[int, Sm90Config]] | None = None):
    """The PrimFunc (sm_90a only): x [M, K] fp16, weight uint32 [N, K/8], scales / zeros fp16 [N, K/G] -> y [M, N].
    M is symbolic; `tilings` [(fewest tokens, config), ...] in ascending order, the first from 0: a call
    launches the last one whose token count M reaches (default: default_tilings for an H100's 132 SMs)."""
    from tvm.script import tirx as T

    tilings = list(tilings or default_tilings(N, 132))
    if not 1 <= len(tilings) <= 3 or tilings[0][0] != 0 or any(a[0] >= b[0] for a, b in zip(tilings, tilings[1:])):
        raise UserError(f"gemm_w4a16_sm90: tilings must start at 0 tokens and ascend (1 to 3 of them), got {tilings}")
    G, KW, NG = group_size, K // 8, K // group_size
    runs = [_kernel(N, K, G, cfg) for _, cfg in tilings]
    n = len(runs)
    run0, run1, run2 = (runs + runs[-1:] * 2)[:3]
    t1, t2 = ([t for t, _ in tilings[1:]] + [0, 0])[:2]

    @T.prim_func(s_tir=True)
    def gemm(x_h: T.handle, w_h: T.handle, s_h: T.handle, z_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "awq_edge.kernel": "gemm_w4a16_sm90"})
        M = T.int64()
        x = T.match_buffer(x_h, (M, K), "float16")
        w = T.match_buffer(w_h, (N, KW), "uint32")
        sc = T.match_buffer(s_h, (N, NG), "float16")
        ze = T.match_buffer(z_h, (N, NG), "float16")
        y = T.match_buffer(y_h, (M, N), "float16")
        # `n` is a Python constant (only the branches that exist are built); the M tests run on the host
        if n == 1:
            run0(x, w, sc, ze, y, M)
        elif n == 2:
            if M >= t1:
                run1(x, w, sc, ze, y, M)
            else:
                run0(x, w, sc, ze, y, M)
        else:
            if M >= t2:
                run2(x, w, sc, ze, y, M)
            elif M >= t1:
                run1(x, w, sc, ze, y, M)
            else:
                run0(x, w, sc, ze, y, M)

    return gemm.with_attr("global_symbol", f"gemm_w4a16_sm90_n{N}_k{K}_g{G}")
