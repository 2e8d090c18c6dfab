"""Prefill GEMM y[M, N] = x[M, K] @ dequant(W)^T for any M (symbolic, up to 8192 and beyond), INT4 weights
in the kernel layout (tvm_kernels/layout.py), FP16 activations and output, FP32 accumulation.

Why this shape of kernel (CUDA, sm_80+: Orin sm_87, sm_86/89/90/120):
- Prefill is compute-bound, so the tensor cores do the math (16x16x16 fp16 MMA fragments, fp32
  accumulators). The weights are dequantized on their way from global to shared memory: each thread
  loads one uint32 (8 nibbles = 8 consecutive k of one row), turns it into 8 fp16 values and stores
  them as one 16-byte vector into the shared tile the MMA fragments read. No dequantized copy of W
  ever reaches global memory, and the global traffic for W is a quarter of FP16's.
- A block computes a (warps_m*frags_m*16) x (warps_n*frags_n*16) tile of y; the k loop walks
  chunk_k*16 columns per step through double-buffered shared tiles (software pipelined: the next
  step's global loads are in flight while the tensor cores work on this one).
- M is symbolic: one compiled kernel serves every prompt length; rows past M are padded with zeros
  in shared memory and never stored. N and K need no padding beyond the tile predicates.
- The schedule follows TVM's dlight tensor-core matmul rule, but the tiling comes from `CudaConfig`
  (derived from the target's shared memory) and the fetch vector is 8 halves so the dequantized word
  lands in one 16-byte store.

CPU (llvm): the same computation, the weight panel for a block of rows dequantized once into fp32
(reused by every row of x), output columns parallel over cores, the inner loop vectorized along N.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from tvm_kernels.errors import UserError
from tvm_kernels.layout import GROUP_SIZES, dequantize_kernel_layout
from tvm_kernels.targets import DeviceTarget, get_target


def reference(x: np.ndarray, weight: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int) -> np.ndarray:
    """numpy float32 y[M, N] = x @ dequant(W)^T (the kernels round the result to fp16; the CUDA kernel
    also rounds each dequantized weight to fp16, as the tensor cores take fp16 operands)."""
    W = dequantize_kernel_layout(weight, scales, zeros, group_size)
    return np.asarray(x, dtype=np.float32) @ W.T


def _check_shape(N: int, K: int, group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise UserError(f"gemm_w4a16: group size must be one of {GROUP_SIZES}, got {group_size}")
    if N <= 0 or K <= 0 or K % group_size:
        raise UserError(f"gemm_w4a16: K={K} must be a positive multiple of the group size {group_size} (N={N})")


def _compute(N: int, K: int, G: int, dequant_dtype: str):
    """The unscheduled PrimFunc: dequantize -> matmul (fp32 accumulation) -> cast to fp16.

    int64 shapes: Relax passes int64 shape variables, and the schedule's layout rewrites need one
    index dtype throughout."""
    from tvm import te, tirx

    i64 = lambda v: tirx.IntImm("int64", v)  # noqa: E731
    M = tirx.Var("M", "int64")
    x = te.placeholder((M, i64(K)), "float16", name="x")
    w = te.placeholder((i64(N), i64(K // 8)), "uint32", name="weight")
    s = te.placeholder((i64(N), i64(K // G)), "float16", name="scales")
    z = te.placeholder((i64(N), i64(K // G)), "float16", name="zeros")

    def dequant(n, k):
        shift = (k % 8).astype("uint32") * tirx.const(4, "uint32")
        q = (w[n, k // 8] >> shift) & tirx.const(15, "uint32")
        return (q.astype(dequant_dtype) - z[n, k // G].astype(dequant_dtype)) * s[n, k // G].astype(dequant_dtype)

    W = te.compute((i64(N), i64(K)), dequant, name="dequant")
    r = te.reduce_axis((i64(0), i64(K)), name="k")
    acc = te.compute(
        (M, i64(N)),
        lambda m, n: te.sum(x[m, r].astype("float32") * W[n, r].astype("float32"), axis=r),
        name="matmul",
    )
    y = te.compute((M, i64(N)), lambda m, n: acc[m, n].astype("float16"), name="y")
    return te.create_prim_func([x, w, s, z, y]).with_attr("tirx.noalias", True)


# ---------------------------------------------------------------- CUDA (tensor cores)

# Our own registration of the five 16x16x16 fp16->fp32 WMMA intrinsics the schedule tensorizes with:
# importing tvm.s_tir.tensor_intrin.cuda would register ~100 intrinsics (about 50 s of CPU parsing
# TVMScript), once per process that builds a kernel.
_WMMA = {"load_a": "awq_edge_wmma_load_a", "load_b": "awq_edge_wmma_load_b", "init": "awq_edge_wmma_fill",
         "store": "awq_edge_wmma_store", "compute": "awq_edge_wmma_sync"}


def _frag_index(buf, stride):
    # fragments are addressed by index within the fragment array, not by element offset
    return buf.elem_offset // stride // 16 * (stride // 16) + buf.elem_offset % stride // 16


# tvm-ffi releases whose JSON graph serializer crashes (SIGSEGV in ToJSONGraph) under apache-tvm
# 0.27.0.post1: schedule tensorize deep-copies through it, so the tensor-core schedule cannot be built.
_BROKEN_TVM_FFI = {"0.1.15.post2"}


def _check_tvm_ffi() -> None:
    from importlib.metadata import version

    v = version("apache-tvm-ffi")
    if v in _BROKEN_TVM_FFI:
        raise UserError(f"gemm_w4a16: apache-tvm-ffi {v} crashes TVM 0.27's tensorize (segfault in ToJSONGraph); "
                        "install apache-tvm-ffi==0.1.14.post0")


def _register_wmma() -> dict:
    from tvm.s_tir import TensorIntrin

    from tvm.script import tirx as T

    if TensorIntrin.get(_WMMA["compute"], allow_missing=True) is not None:
        return _WMMA
    F16, F32, OF = "float16", "float32", 16

    def copy_pair(src_scope, dst_scope, dtype, emit):
        @T.prim_func(s_tir=True)
        def desc(a: T.handle, c: T.handle) -> None:
            A = T.match_buffer(a, (16, 16), dtype, align=64, offset_factor=OF, scope=src_scope)
            C = T.match_buffer(c, (16, 16), dtype, align=64, offset_factor=OF, scope=dst_scope)
            with T.sblock("root"):
                T.reads(A[0:16, 0:16])
                T.writes(C[0:16, 0:16])
                for i, j in T.grid(16, 16):
                    with T.sblock("copy"):
                        vi, vj = T.axis.remap("SS", [i, j])
                        C[vi, vj] = A[vi, vj]

        @T.prim_func(s_tir=True)
        def impl(a: T.handle, c: T.handle) -> None:
            s1, s0, d1, d0 = T.int32(), T.int32(), T.int32(), T.int32()
            A = T.match_buffer(a, (16, 16), dtype, align=64, offset_factor=OF, scope=src_scope, strides=[s1, s0])
            C = T.match_buffer(c, (16, 16), dtype, align=64, offset_factor=OF, scope=dst_scope, strides=[d1, d0])
            with T.sblock("root"):
                T.reads(A[0:16, 0:16])
                T.writes(C[0:16, 0:16])
                T.evaluate(emit(A, C, s1, d1))

        return desc, impl

    def load(layout):
        return lambda A, C, s1, d1: T.tvm_load_matrix_sync(
            C.data, 16, 16, 16, _frag_index(C, d1), A.access_ptr("r", ptr_type=F16), s1, layout, dtype="void")

    def store(A, C, s1, d1):
        return T.tvm_store_matrix_sync(
            A.data, 16, 16, 16, _frag_index(A, s1), C.access_ptr("w", ptr_type=F32), d1, "row_major", dtype="void")

    TensorIntrin.register(_WMMA["load_a"], *copy_pair("shared.dyn", "wmma.matrix_a", F16, load("row_major")))
    # B is stored [n, k] (K-contiguous, like the weights): a column-major k x n fragment
    TensorIntrin.register(_WMMA["load_b"], *copy_pair("shared.dyn", "wmma.matrix_b", F16, load("col_major")))
    TensorIntrin.register(_WMMA["store"], *copy_pair("wmma.accumulator", "shared.dyn", F32, store))

    @T.prim_func(s_tir=True)
    def fill_desc(c: T.handle) -> None:
        C = T.match_buffer(c, (16, 16), F32, align=64, offset_factor=OF, scope="wmma.accumulator")
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:16, 0:16])
            for i, j in T.grid(16, 16):
                with T.sblock("init"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    C[vi, vj] = T.float32(0)

    @T.prim_func(s_tir=True)
    def fill_impl(c: T.handle) -> None:
        d1, d0 = T.int32(), T.int32()
        C = T.match_buffer(c, (16, 16), F32, align=64, offset_factor=OF, scope="wmma.accumulator", strides=[d1, d0])
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:16, 0:16])
            T.evaluate(T.tvm_fill_fragment(C.data, 16, 16, 16, _frag_index(C, d1), T.float32(0), dtype="void"))

    TensorIntrin.register(_WMMA["init"], fill_desc, fill_impl)

    @T.prim_func(s_tir=True)
    def sync_desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (16, 16), F16, align=64, offset_factor=OF, scope="wmma.matrix_a")
        B = T.match_buffer(b, (16, 16), F16, align=64, offset_factor=OF, scope="wmma.matrix_b")
        C = T.match_buffer(c, (16, 16), F32, align=64, offset_factor=OF, scope="wmma.accumulator")
        with T.sblock("root"):
            T.reads(C[0:16, 0:16], A[0:16, 0:16], B[0:16, 0:16])
            T.writes(C[0:16, 0:16])
            for i, j, k in T.grid(16, 16, 16):
                with T.sblock(""):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    C[vi, vj] = C[vi, vj] + T.Cast(F32, A[vi, vk]) * T.Cast(F32, B[vj, vk])

    @T.prim_func(s_tir=True)
    def sync_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        a1, a0, b1, b0, c1, c0 = T.int32(), T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
        A = T.match_buffer(a, (16, 16), F16, align=64, offset_factor=OF, scope="wmma.matrix_a", strides=[a1, a0])
        B = T.match_buffer(b, (16, 16), F16, align=64, offset_factor=OF, scope="wmma.matrix_b", strides=[b1, b0])
        C = T.match_buffer(c, (16, 16), F32, align=64, offset_factor=OF, scope="wmma.accumulator", strides=[c1, c0])
        with T.sblock("root"):
            T.reads(C[0:16, 0:16], A[0:16, 0:16], B[0:16, 0:16])
            T.writes(C[0:16, 0:16])
            T.evaluate(T.tvm_mma_sync(C.data, _frag_index(C, c1), A.data, _frag_index(A, a1), B.data,
                                      _frag_index(B, b1), C.data, _frag_index(C, c1), dtype="void"))

    TensorIntrin.register(_WMMA["compute"], sync_desc, sync_impl)
    return _WMMA



@dataclass(frozen=True)
class CudaConfig:
    warps_m: int = 4  # warps along M in a block
    warps_n: int = 4  # warps along N
    frags_m: int = 2  # 16x16 accumulator fragments per warp along M
    frags_n: int = 2  # ... along N
    chunk_k: int = 4  # 16-wide k steps per shared tile (tile depth = 16 * chunk_k)
    vector_a: int = 8  # halves per thread per global->shared copy of x (8 = one 16-byte load)
    # ... of dequantized W. 4, not 8: TVM's CUDA codegen mis-declares an 8-lane uint32 vector (the
    # broadcast word) as ulonglong4; nvcc merges the lanes' identical word loads into one anyway.
    vector_b: int = 4

    @property
    def block_m(self) -> int:
        return self.warps_m * self.frags_m * 16

    @property
    def block_n(self) -> int:
        return self.warps_n * self.frags_n * 16

    @property
    def threads(self) -> int:
        return self.warps_m * self.warps_n * 32

    def shared_bytes(self) -> int:
        """Double-buffered A and B tiles (rows padded by 8 halves), or the fp32 output staging tile
        (the two are never live at once, so the allocator overlaps them)."""
        bk = 16 * self.chunk_k
        tiles = 2 * (self.block_m + self.block_n) * (bk + 8) * 2
        out = self.block_m * (self.block_n + 4) * 4
        return max(tiles, out)


# Shared memory a block may opt into (cudaFuncSetAttribute), by architecture. TVM requests the dynamic
# size for us at launch; the static 48 KB default in targets.py is not the limit for dynamic shared memory.
_OPT_IN_SHARED = {"sm_80": 163 * 1024, "sm_87": 163 * 1024, "sm_86": 99 * 1024, "sm_89": 99 * 1024,
                  "sm_90": 227 * 1024, "sm_120": 99 * 1024}


def _staging_fits(cfg: CudaConfig) -> bool:
    """TVM 0.27's shared-memory planner reuses a freed fp16 tile buffer for the fp32 output staging tile
    when the staging tile fits in it, and then fails to build (tvm_access_ptr element type mismatch);
    keep the staging tile larger than either double-buffered tile."""
    bk = 16 * cfg.chunk_k
    out = cfg.block_m * (cfg.block_n + 4) * 4
    return out > 2 * cfg.block_m * (bk + 8) * 2 and out > 2 * cfg.block_n * (bk + 8) * 2


def valid_config(cfg: CudaConfig) -> bool:
    return cfg.chunk_k >= 1 and _staging_fits(cfg) and cfg.vector_a in (1, 2, 4, 8) and cfg.vector_b in (1, 2, 4)


def cuda_config(N: int, K: int, target: DeviceTarget) -> CudaConfig:
    """Tiling from the target's shared memory and SM count and the shape: small N (or a small GPU such
    as the Orin) gets narrower blocks so the padding waste stays low and enough blocks exist."""
    limit = _OPT_IN_SHARED.get(target.arch or "", target.max_shared_memory_per_block)
    cfg = CudaConfig()
    if N <= 256 or (target.num_sms and target.num_sms <= 16 and N < 2048):
        cfg = CudaConfig(warps_m=4, warps_n=2, frags_m=2, frags_n=2, chunk_k=2)
    while cfg.chunk_k > 1 and (K % (16 * cfg.chunk_k) or cfg.shared_bytes() > limit or not _staging_fits(cfg)):
        cfg = dataclasses.replace(cfg, chunk_k=cfg.chunk_k // 2)
    return cfg


def _schedule_cuda(func, cfg: CudaConfig):
    from tvm import s_tir
    from tvm.s_tir.dlight.gpu.matmul import auto_inline_consumer_chain, auto_inline_producers, get_index_map

    sch = s_tir.Schedule(func)
    main = sch.get_sblock("matmul")

    # Normalize to C[S, I, J] += A[S, I, K] * B[S, J, K] (S = 1) so the fragment intrinsics match.
    reindex_a = sch.reindex(main, ("read", 0))
    reindex_b = sch.reindex(main, ("read", 1))
    reindex_c = sch.reindex(main, ("write", 0))
    matmul_map, a_map, b_map, c_map = get_index_map(sch.get(main))
    sch.transform_layout(reindex_a, ("write", 0), a_map)
    sch.transform_layout(reindex_b, ("write", 0), b_map)
    sch.transform_layout(reindex_c, ("read", 0), c_map)
    sch.transform_block_layout(main, matmul_map)

    sch.pad_einsum(main, [1, cfg.block_m, cfg.block_n, 16 * cfg.chunk_k])
    batch, i, j, k = sch.get_loops(main)
    i, i_in = sch.split(i, factors=[None, 16])
    j, j_in = sch.split(j, factors=[None, 16])
    k, k_in = sch.split(k, factors=[None, 16])
    sch.reorder(i, j, k, i_in, j_in, k_in)
    block_inner = main
    block_outer = sch.blockize(i_in)

    i0, i1, i2, i3 = sch.split(i, factors=[None, 1, cfg.warps_m, cfg.frags_m])
    j0, j1, j2, j3 = sch.split(j, factors=[1, None, cfg.warps_n, cfg.frags_n])
    k0, k1 = sch.split(k, factors=[None, cfg.chunk_k])
    # stage 0: global->register loads of the next tile; stage 1: fragment loads + MMA on this one
    sch.annotate(k0, "software_pipeline_order", [0, 3, 1, 4, 5, 2, 6])
    sch.annotate(k0, "software_pipeline_stage", [0, 0, 0, 0, 0, 1, 1])
    sch.annotate(k1, "software_pipeline_order", [0, 1, 2])
    sch.annotate(k1, "software_pipeline_stage", [0, 0, 1])
    sch.reorder(i0, j0, i1, j1, j2, i2, k0, k1, i3, j3)
    sch.bind(batch, "blockIdx.z")
    sch.bind(sch.fuse(i0, j0), "blockIdx.x")
    sch.bind(sch.fuse(i1, j1), "blockIdx.y")
    warp_loop = sch.fuse(j2, i2)
    sch.bind(warp_loop, "threadIdx.y")
    warps = cfg.warps_m * cfg.warps_n

    def fetch_to_shared(index, vector):
        blk = sch.cache_read(block_outer, index, "shared.dyn")
        sch.compute_at(blk, k0)
        fused = sch.fuse(*sch.get_loops(blk)[-2:])
        _, ty, tx, vec = sch.split(fused, factors=[None, warps, 32, vector])
        sch.bind(tx, "threadIdx.x")
        sch.bind(ty, "threadIdx.y")
        sch.vectorize(vec)
        sch.storage_align(blk, 0, axis=-2, factor=16, offset=8)  # pad rows: no bank conflicts for fragments
        sch.annotate(blk, "tirx.manifest_shared_memory_local_stage", 1)
        sch.annotate(blk, "double_buffer_scope", 0)
        return blk

    a_g2s = fetch_to_shared(0, cfg.vector_a)
    b_g2s = fetch_to_shared(1, cfg.vector_b)
    auto_inline_producers(sch, a_g2s)
    auto_inline_producers(sch, b_g2s)  # the dequantize expression moves into the B copy

    a_frag = sch.cache_read(block_outer, 0, "wmma.matrix_a")
    b_frag = sch.cache_read(block_outer, 1, "wmma.matrix_b")
    sch.compute_at(a_frag, k1)
    sch.compute_at(b_frag, k1)
    out_shared = sch.cache_write(block_outer, 0, "shared.dyn")
    sch.storage_align(out_shared, 0, -2, 16, 4)
    store = sch.cache_write(block_outer, 0, "wmma.accumulator")
    sch.reverse_compute_at(store, warp_loop)
    sch.reverse_compute_at(out_shared, warp_loop)
    si, sj = sch.get_loops(store)[-2:]
    si0, si1 = sch.split(si, factors=[None, 16])
    sj0, sj1 = sch.split(sj, factors=[None, 16])
    sch.reorder(si0, sj0, si1, sj1)
    init = sch.decompose_reduction(block_outer, k0)
    init_inner = sch.get_child_blocks(init)[0]

    intrin = _register_wmma()
    for frag, name in ((a_frag, "load_a"), (b_frag, "load_b")):
        fi, fj = sch.get_loops(frag)[-2:]
        fi0, fi1 = sch.split(fi, factors=[None, 16])
        fj0, fj1 = sch.split(fj, factors=[None, 16])
        sch.reorder(fi0, fj0, fi1, fj1)
        sch.unroll(fi0)
        sch.unroll(fj0)
        sch.tensorize(fi1, intrin[name])
    sch.tensorize(sch.get_loops(init_inner)[-2], intrin["init"])
    sch.tensorize(sch.get_loops(store)[-2], intrin["store"])
    sch.tensorize(sch.get_loops(block_inner)[-3], intrin["compute"])

    auto_inline_consumer_chain(sch, out_shared)  # the fp16 cast rides on the shared->global copy
    fused = sch.fuse(*sch.get_loops(out_shared)[-2:])
    _, tx, vec = sch.split(fused, factors=[None, 32, 4])
    sch.bind(tx, "threadIdx.x")
    sch.vectorize(vec)
    return sch.mod["main"]


# ---------------------------------------------------------------- CPU (llvm)


@dataclass(frozen=True)
class CpuConfig:
    block_n: int  # output columns per parallel task (vectorized)
    block_k: int  # depth of the dequantized fp32 weight panel


def cpu_config(N: int, K: int, G: int, target: DeviceTarget) -> CpuConfig:
    lanes = max(4, target.vector_bytes // 4)
    block_n = 2 * lanes
    while block_n > lanes and N % block_n and N % lanes == 0:
        block_n //= 2
    # a panel of block_k x block_n fp32 weights stays in L1 (block_k a multiple of the group size)
    block_k = G * max(1, 256 // G)
    while K % block_k:
        block_k //= 2
    return CpuConfig(block_n=block_n, block_k=block_k)


def _schedule_cpu(func, cfg: CpuConfig):
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    main = sch.get_sblock("matmul")
    deq = sch.get_sblock("dequant")
    m, n, k = sch.get_loops(main)
    no, ni = sch.split(n, factors=[None, cfg.block_n])
    ko, ki = sch.split(k, factors=[None, cfg.block_k])
    sch.reorder(no, ko, m, ki, ni)
    sch.parallel(no)
    sch.vectorize(ni)
    # Dequantize this (block_k x block_n) panel once, stored k-major so the inner loop reads it as
    # contiguous vectors along n; every row of x reuses it.
    sch.compute_at(deq, ko)
    sch.transform_layout(deq, ("write", 0), lambda a, b: (b, a))
    init = sch.decompose_reduction(main, ko)
    sch.vectorize(sch.get_loops(init)[-1])
    # Round each task's fp32 strip to fp16 right after its reduction: the fp32 accumulator shrinks to
    # [M, block_n] per task instead of a full [M, N] buffer.
    y = sch.get_sblock("y")
    sch.reverse_compute_at(y, no)
    sch.vectorize(sch.get_loops(y)[-1])
    return sch.mod["main"]


def gemm_w4a16(N: int, K: int, group_size: int, target, config: CudaConfig | CpuConfig | None = None):
    """A scheduled TIR PrimFunc with symbolic M: (x f16 [M, K], weight u32 [N, K/8], scales f16 [N, K/G],
    zeros f16 [N, K/G], y f16 [M, N]) for `target` (a name from tvm_kernels.targets or a DeviceTarget).
    `config` overrides the tiling (benchmarks sweep it)."""
    N, K, group_size = int(N), int(K), int(group_size)
    _check_shape(N, K, group_size)
    t = get_target(target)
    if t.is_cuda:
        sm = int((t.arch or "sm_0").removeprefix("sm_").rstrip("a") or 0)
        if sm < 80:
            raise UserError(f"gemm_w4a16: target {t.name} ({t.arch}) lacks sm_80 tensor cores")
        _check_tvm_ffi()
        cfg = config or cuda_config(N, K, t)
        if not valid_config(cfg):
            raise UserError(f"gemm_w4a16: CUDA config {cfg} is not buildable (see _staging_fits)")
        return _schedule_cuda(_compute(N, K, group_size, "float16"), cfg)
    cfg = config or cpu_config(N, K, group_size, t)
    return _schedule_cpu(_compute(N, K, group_size, "float32"), cfg)
