"""Prefill GEMM y[M, N] = x[M, K] @ dequant(W)^T for any M (symbolic, up to 8192 and beyond), INT4 weights
in the kernel layout (tvm_kernels/layout.py), FP16 activations and output, FP32 accumulation.

Why this shape of kernel (CUDA, sm_80+: Orin sm_87, sm_86/89/90/120):
- Prefill is compute-bound, so the tensor cores do the math (16x16x16 fp16 WMMA fragments, fp32
  accumulators). No dequantized copy of W ever reaches global memory: the global traffic for W is the
  packed words, a quarter of FP16's.
- A multi-stage cp.async pipeline (`stages` deep, TVM's software_pipeline_async_stages): the x tile and
  the *packed* uint32 W tile of step k + stages - 1 are in flight while step k computes. Step k's packed
  tile is dequantized shared -> shared (Marlin's order) into an fp16 tile right before the fragments
  read it; the dequantize builds fp16 1024 + q from the bits 0x6400 | q (no int->float conversion,
  a quarter-rate instruction). Inside a step the fragments of the next 16-wide k slice load while the
  MMAs of this one run (`frag_prefetch`).
- A block computes a (warps_m*frags_m*16) x (warps_n*frags_n*16) tile of y; `cuda_config` picks the
  tiling from the target's SM count and shared memory (one schedule for every target).
- M is symbolic: one compiled kernel serves every prompt length; rows past M are padded with zeros
  (predicated cp.async) and never stored. N and K need no padding beyond the tile predicates.
- Build inside `tvm.transform.PassContext(config=BUILD_CONFIG)`: without it TVM turns the cp.async
  copies back into synchronous loads (correct, but no overlap).
- Fragments: WMMA by default; `CudaConfig(fragments="mma")` uses ldmatrix + mma.sync m16n8k16 instead,
  measured 0.93-1.4x the WMMA picks per shape on the H100 (2x4 warps of 64x32), but needs MMA_BUILD_CONFIG and
  `tir_pipeline=mma_tir_pipeline()` at build time (TVM 0.27's LowerWarpMemory lowers one "warp" buffer
  per run; without them the kernel stays correct but keeps its fragments in local memory). It becomes
  the default once every caller (export) builds that way.
- Where the time goes (H100, benchmarks/results/gemm_sweep_h100_cpasync*.json): this pipeline with plain
  fp16 weights reaches only 0.35-0.44x of cuBLAS (which uses wgmma); the INT4 copy + dequantize adds
  10-20% on top. Reaching 0.6x needs a different main loop, not a better dequantize: on Hopper built as
  sm_90a, gemm_w4a16() returns the wgmma kernel of gemm_w4a16_sm90.py instead (1.5-2.2x this one).

CPU (llvm): output columns parallel over cores, each task's weight panel dequantized once into fp32 and
reused by every row of x, six rows at a time with their accumulators in registers (`_cpu_kernel`).
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


def _compute(N: int, K: int, G: int):
    """The unscheduled PrimFunc of the CUDA schedules: dequantize to fp16 -> matmul (fp32 accumulation) -> cast
    to fp16.

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
        # fp16 with the bits 0x6400 | q is exactly 1024 + q: a bit OR instead of an int->fp16
        # conversion (a quarter-rate instruction on the GPU that would bound the kernel). Same values:
        # (1024 + q) - (1024 + z) is the exact small integer q - z, then one rounding by the scale.
        magic = tirx.const(0x6400, "uint16")
        qf = tirx.reinterpret("float16", q.astype("uint16") | magic)
        # the constant as bits too: a float literal becomes a non-foldable conversion per element
        return (qf - (z[n, k // G] + tirx.reinterpret("float16", magic))) * s[n, k // G]

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
         "load_b_static": "awq_edge_wmma_load_b_static",
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
    TensorIntrin.register(_WMMA["load_b_static"], *copy_pair("shared", "wmma.matrix_b", F16, load("col_major")))
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


def _mma_generators():
    """TVM's own generators of the ldmatrix / mma.sync tensor intrinsics, without importing their module:
    tvm.s_tir.tensor_intrin.cuda registers ~100 intrinsics on import (about 50 s of TVMScript parsing
    per process); we run its function definitions only and register the four we use."""
    import ast
    import os
    import types

    import tvm

    path = os.path.join(os.path.dirname(tvm.__file__), "s_tir", "tensor_intrin", "cuda.py")
    tree = ast.parse(open(path).read())
    tree.body = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom, ast.Assign))
                 or (isinstance(n, ast.FunctionDef) and not n.decorator_list)]
    mod = types.ModuleType("_awq_edge_mma_intrin")
    mod.__file__ = path  # TVMScript reads the functions' source through it
    exec(compile(tree, path, "exec"), mod.__dict__)  # noqa: S102 (TVM's own installed source)
    return mod


_MMA = {"load_a": "awq_edge_mma_ldmatrix_a", "init": "awq_edge_mma_fill_f32",
        "compute": "awq_edge_mma_f16f16f32_trans_b", "store": "awq_edge_mma_store_f32_shared_dyn"}
_MMA_GEN: list = []


def _ldmatrix_layout(s, i, j):
    (gen,) = _MMA_GEN
    return (s, i // 16, j // 16, *gen.shared_16x16_to_ldmatrix_32x8_layout(i % 16, j % 16))


def _register_mma(b_scope: str) -> dict:
    """A from shared.dyn, B (stored [n, k]: the transposed ldmatrix) from `b_scope`, fp32 accumulators."""
    from tvm.s_tir import TensorIntrin

    if not _MMA_GEN:
        _MMA_GEN.append(_mma_generators())
    (gen,) = _MMA_GEN
    names = {**_MMA, "load_b": f"awq_edge_mma_ldmatrix_b_trans_{b_scope.replace('.', '_')}"}
    if TensorIntrin.get(names["compute"], allow_missing=True) is None:
        TensorIntrin.register(names["load_a"], *gen.get_ldmatrix_intrin(16, "float16", "A", False, "shared.dyn"))
        TensorIntrin.register(names["compute"], *gen.get_mma_intrin(16, "float16", "float16", "float32", False, True))
        TensorIntrin.register(names["init"], *gen.get_mma_fill_intrin("float32", 8))
        TensorIntrin.register(names["store"], *gen.get_mma_store_intrin("float32", 8, "shared.dyn", False))
    if TensorIntrin.get(names["load_b"], allow_missing=True) is None:
        TensorIntrin.register(names["load_b"], *gen.get_ldmatrix_intrin(16, "float16", "B", True, b_scope))
    return names



@dataclass(frozen=True)
class CudaConfig:
    warps_m: int = 2  # warps along M in a block
    warps_n: int = 2  # warps along N
    frags_m: int = 4  # 16x16 accumulator fragments per warp along M
    frags_n: int = 4  # ... along N
    chunk_k: int = 4  # 16-wide k steps per shared tile (tile depth = 16 * chunk_k); >= 2 (16-byte weight copies)
    stages: int = 3  # cp.async pipeline depth: tiles of x and packed W in flight
    # 1: load the fragments of the next 16-wide k step while the MMAs of this one run (costs registers)
    frag_prefetch: int = 1
    # "wmma": 16x16x16 WMMA fragments (builds and runs fast with any TIR pipeline); "mma": ldmatrix +
    # mma.sync m16n8k16 on "warp"-scope fragments, fast only when built with MMA_BUILD_CONFIG and the
    # TIR pipeline from mma_tir_pipeline() (see there), and best with frag_prefetch=0 (the prefetch's two
    # fragment copies get run-time indices and land in local memory)
    fragments: str = "wmma"
    vector_a: int = 8  # halves per thread per cp.async of x (8 = 16 bytes, the cp.async maximum)
    # halves per thread per dequantize step (shared packed word -> shared fp16 tile). 4, not 8: TVM's CUDA
    # codegen mis-declares an 8-lane uint32 vector (the broadcast word) as ulonglong4.
    vector_b: int = 4

    @property
    def block_m(self) -> int:
        return self.warps_m * self.frags_m * 16

    @property
    def block_n(self) -> int:
        return self.warps_n * self.frags_n * 16

    @property
    def block_k(self) -> int:
        return 16 * self.chunk_k

    @property
    def threads(self) -> int:
        return self.warps_m * self.warps_n * 32

    def a_tile_bytes(self) -> int:  # all stages of x tiles (rows padded by 8 halves)
        return self.stages * self.block_m * (self.block_k + 8) * 2

    def w_tile_bytes(self) -> int:  # all stages of packed weight tiles
        return self.stages * self.block_n * self.block_k // 2

    def b_tile_bytes(self) -> int:  # the dequantized fp16 tile (static shared memory)
        return self.block_n * (self.block_k + 8) * 2

    def out_tile_bytes(self) -> int:  # the fp32 output staging tile (reuses the pipeline's space)
        return self.block_m * (self.block_n + 4) * 4

    def shared_bytes(self) -> int:
        return self.b_tile_bytes() + max(self.a_tile_bytes() + self.w_tile_bytes(), self.out_tile_bytes())


# Shared memory a block may opt into (cudaFuncSetAttribute), by architecture. TVM requests the dynamic
# size for us at launch; the static 48 KB default in targets.py is not the limit for dynamic shared memory.
_OPT_IN_SHARED = {"sm_80": 163 * 1024, "sm_87": 163 * 1024, "sm_86": 99 * 1024, "sm_89": 99 * 1024,
                  "sm_90": 227 * 1024, "sm_90a": 227 * 1024, "sm_120": 99 * 1024}
_STATIC_SHARED = 48 * 1024

# Pass-context options the CUDA kernel wants at build time: without `tirx.use_async_copy` TVM lowers the
# pipeline's global->shared copies to plain loads + stores (still correct, but the copies no longer overlap
# the math). Build with `tvm.transform.PassContext(config=BUILD_CONFIG)` around `tvm.compile`.
BUILD_CONFIG = {"tirx.use_async_copy": True}
# fragments="mma" also needs TIR's common-subexpression pass off: it hides the fragment indices behind let
# variables in which LowerWarpMemory then cannot find the lane index
MMA_BUILD_CONFIG = {**BUILD_CONFIG, "tirx.disable_cse_tir": True}
_MMA_PIPELINE = "awq_edge_mma"


def mma_tir_pipeline() -> str:
    """Name of a TIR pipeline (registered on first call) for `tvm.compile(..., tir_pipeline=name)` that
    builds fragments="mma" kernels properly: TVM 0.27's default one with LowerWarpMemory run repeatedly.
    That pass lowers only the first "warp"-scope buffer of a statement sequence per run (the others stay
    full-warp arrays in local memory: correct but slow), and a kernel has three to six (A, B, the
    accumulator, and the copies the software pipeline makes); a run with none left changes nothing."""
    import tvm
    from tvm.s_tir import pipeline as s_tir_pipeline
    from tvm.tirx import compilation_pipeline

    if _MMA_PIPELINE not in compilation_pipeline.PIPELINE_MAP:
        def factory():
            lower, finalize_host, finalize_device = s_tir_pipeline.default_s_tir_pipeline()

            def finalize_device_mma():
                warp = [tvm.tirx.transform.LowerWarpMemory()] * 8
                return tvm.ir.transform.Sequential(warp + [finalize_device()])

            return lower, finalize_host, finalize_device_mma

        compilation_pipeline.register_tir_pipeline(_MMA_PIPELINE, factory)
    return _MMA_PIPELINE


def _staging_fits(cfg: CudaConfig) -> bool:
    """TVM 0.27's shared-memory planner reuses a freed fp16 tile buffer for the fp32 output staging tile
    when the staging tile fits in it, and then fails to build (tvm_access_ptr element type mismatch);
    the staging tile must stay larger than each of the pipeline's buffers (padding the staging rows
    further does not help: measured on the builds)."""
    return cfg.out_tile_bytes() > max(cfg.a_tile_bytes(), cfg.w_tile_bytes())


def valid_config(cfg: CudaConfig) -> bool:
    # TVM opts a kernel into more than 48 KB of shared memory only when its *dynamic* part exceeds 48 KB;
    # static (the dequantized tile) + dynamic above 48 KB with a small dynamic part fails to launch.
    opt_in_ok = cfg.out_tile_bytes() > _STATIC_SHARED or cfg.shared_bytes() <= _STATIC_SHARED
    return (opt_in_ok and cfg.chunk_k >= 2 and cfg.stages >= 2 and _staging_fits(cfg) and cfg.vector_a == 8
            and cfg.frag_prefetch in (0, 1) and cfg.fragments in ("wmma", "mma")
            and cfg.vector_b in (1, 2, 4) and cfg.b_tile_bytes() <= _STATIC_SHARED)


def _fit(cfg: CudaConfig, K: int, limit: int) -> CudaConfig | None:
    """`cfg` with a 32-deep k tile where K needs it and no more stages than shared memory and K allow."""
    while cfg.chunk_k > 2 and K % cfg.block_k:
        cfg = dataclasses.replace(cfg, chunk_k=cfg.chunk_k // 2)
    while cfg.stages > 2 and (cfg.shared_bytes() > limit or cfg.stages > K // cfg.block_k):
        cfg = dataclasses.replace(cfg, stages=cfg.stages - 1)
    return cfg if cfg.shared_bytes() <= limit and valid_config(cfg) else None


def cuda_config(N: int, K: int, target: DeviceTarget, fragments: str = "wmma") -> CudaConfig:
    """Tiling from the target's SM count and shared memory and the shape. M is symbolic (one kernel serves
    every prompt length), so the block count is judged at a 512-token prompt, the short end that decides
    the time to first token. Measured on the H100 (benchmarks/results/gemm_sweep_h100_cpasync.json):
    - the default, 128x128 tiles by 4 warps of 64x64 (few fragment loads per MMA, 2 blocks per SM);
    - few column tiles (N <= 4096 on 132 SMs): 8 warps of 32x64 per 128x128 block, since one 4-warp
      block per SM cannot hide latency;
    - many column tiles (N >= 16384 on 132 SMs): 256x128 tiles by 8 warps of 64x64, which halve the
      dequantize work per MMA and still fill the GPU at M = 512 (not on Orin-class GPUs, where a short
      prompt would leave most of a 256-row tile as padding).
    fragments="mma" (only for builds with MMA_BUILD_CONFIG + mma_tir_pipeline()): 128x128 tiles by 2x4
    warps of 64x32, which measured best for every 7B shape at both M."""
    if fragments not in ("wmma", "mma"):
        raise UserError(f"gemm_w4a16: fragments must be 'wmma' or 'mma', got {fragments!r}")
    limit = _OPT_IN_SHARED.get(target.arch or "", target.max_shared_memory_per_block)
    sms = target.num_sms or 132
    col_tiles = -(-N // 128)
    candidates = [CudaConfig()]
    if fragments == "mma":
        candidates = [CudaConfig(warps_m=2, warps_n=4, frags_m=4, frags_n=2, frag_prefetch=0, fragments="mma"),
                      CudaConfig(frag_prefetch=0, fragments="mma")]
    elif col_tiles * 4 < 1.5 * sms:
        candidates.insert(0, CudaConfig(warps_m=4, warps_n=2, frags_m=2, frags_n=4, frag_prefetch=0))
    elif col_tiles * 2 >= 2 * sms and sms > 16:  # not on Orins: short prompts would pad 256-row tiles
        candidates.insert(0, CudaConfig(warps_m=4, warps_n=2, frags_m=4, frags_n=4))
    for cfg in candidates:
        fitted = _fit(cfg, K, limit)
        if fitted is not None:
            return fitted
    raise UserError(f"gemm_w4a16: no CUDA tiling fits {limit} bytes of shared memory on {target.name} (N={N}, K={K})")


def _schedule_cuda(func, cfg: CudaConfig, fp16_weight: bool = False):
    """fp16_weight: `func` multiplies by a plain fp16 W (no dequantize stage; W is copied like x). Only the
    benchmark uses it, as the ceiling of this same pipeline without the INT4 work."""
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

    sch.pad_einsum(main, [1, cfg.block_m, cfg.block_n, cfg.block_k])
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
    sch.reorder(i0, j0, i1, j1, j2, i2, k0, k1, i3, j3)
    sch.bind(batch, "blockIdx.z")
    sch.bind(sch.fuse(i0, j0), "blockIdx.x")
    sch.bind(sch.fuse(i1, j1), "blockIdx.y")
    warp_loop = sch.fuse(j2, i2)
    sch.bind(warp_loop, "threadIdx.y")
    warps = cfg.warps_m * cfg.warps_n

    def cooperative(blk, vector, pad_rows=True):
        fused = sch.fuse(*sch.get_loops(blk)[-2:])
        outer, ty, tx, vec = sch.split(fused, factors=[None, warps, 32, vector])
        sch.bind(tx, "threadIdx.x")
        sch.bind(ty, "threadIdx.y")
        sch.vectorize(vec)
        if pad_rows:  # rows padded by 8 halves: the fragment loads hit distinct banks
            sch.storage_align(blk, 0, axis=-2, factor=32, offset=8)
        return outer

    # x tile: global -> shared by cp.async (stage 0 of the pipeline, `stages - 1` tiles ahead).
    a_shared = sch.cache_read(block_outer, 0, "shared.dyn")
    sch.compute_at(a_shared, k0)
    # The dequantized fp16 W tile. Static shared memory on purpose: TVM's barrier planner treats all
    # dynamic shared buffers as one, and would put a barrier between every dequantize step (each reads
    # the packed tile and writes this one).
    b_shared = sch.cache_read(block_outer, 1, "shared.dyn" if fp16_weight else "shared")
    sch.compute_at(b_shared, k0)
    auto_inline_producers(sch, a_shared)
    auto_inline_producers(sch, b_shared)  # the dequantize expression (and the N padding) moves in here
    cooperative(a_shared, cfg.vector_a)
    if fp16_weight:
        cooperative(b_shared, cfg.vector_a)
    else:
        reads = [r.source.name for r in sch.get(b_shared).reads]
        # The packed uint32 W tile: global -> shared by cp.async (a quarter of FP16's bytes), dequantized
        # shared -> shared right before the fragments read it (Marlin's order, minus its register tricks).
        w_shared = sch.cache_read(b_shared, reads.index("weight"), "shared.dyn")
        sch.compute_at(w_shared, k0)
        sch.unroll(cooperative(b_shared, cfg.vector_b))
        cooperative(w_shared, 4, pad_rows=False)

    mma = cfg.fragments == "mma"
    a_frag = sch.cache_read(block_outer, 0, "warp" if mma else "wmma.matrix_a")
    b_frag = sch.cache_read(block_outer, 1, "warp" if mma else "wmma.matrix_b")
    sch.compute_at(a_frag, k1)
    sch.compute_at(b_frag, k1)
    out_shared = sch.cache_write(block_outer, 0, "shared.dyn")
    sch.storage_align(out_shared, 0, -2, 16, 4)
    store = sch.cache_write(block_outer, 0, "warp" if mma else "wmma.accumulator")
    sch.reverse_compute_at(store, warp_loop)
    sch.reverse_compute_at(out_shared, warp_loop)
    si, sj = sch.get_loops(store)[-2:]
    si0, si1 = sch.split(si, factors=[None, 16])
    sj0, sj1 = sch.split(sj, factors=[None, 16])
    sch.reorder(si0, sj0, si1, sj1)
    init = sch.decompose_reduction(block_outer, k0)
    init_inner = sch.get_child_blocks(init)[0]

    b_scope = "shared.dyn" if fp16_weight else "shared"
    intrin = _register_mma(b_scope) if mma else _register_wmma()
    loads = []
    for frag, name in ((a_frag, "load_a"), (b_frag, "load_b" if mma or fp16_weight else "load_b_static")):
        fi, fj = sch.get_loops(frag)[-2:]
        fi0, fi1 = sch.split(fi, factors=[None, 16])
        fj0, fj1 = sch.split(fj, factors=[None, 16])
        sch.reorder(fi0, fj0, fi1, fj1)
        sch.unroll(fi0)
        sch.unroll(fj0)
        loads.append((fi1, intrin[name]))
    if mma:  # each thread's 8 values of a 16x16 tile, in the register order ldmatrix/mma.sync use
        for blk, buf in ((a_frag, ("write", 0)), (b_frag, ("write", 0)), (store, ("read", 0))):
            sch.transform_layout(blk, buf, _ldmatrix_layout)
    for loop, name in loads:
        sch.tensorize(loop, name)
    sch.tensorize(sch.get_loops(init_inner)[-2], intrin["init"])
    sch.tensorize(sch.get_loops(store)[-2], intrin["store"])
    sch.tensorize(sch.get_loops(block_inner)[-3], intrin["compute"])

    auto_inline_consumer_chain(sch, out_shared)  # the fp16 cast rides on the shared->global copy
    fused = sch.fuse(*sch.get_loops(out_shared)[-2:])
    _, tx, vec = sch.split(fused, factors=[None, 32, 4])
    sch.bind(tx, "threadIdx.x")
    sch.vectorize(vec)

    # Inner loop: the fragments of k step k1 + 1 load while the MMAs of step k1 run.
    if cfg.frag_prefetch:
        sch.annotate(k1, "software_pipeline_stage", [0, 0, 1])
        sch.annotate(k1, "software_pipeline_order", [0, 1, 2])
    # Outer loop, after the inner one is pipelined: [x copy, W copy, dequantize, inner prologue, body,
    # epilogue] (or [.., dequantize, inner loop]). The two copies run `stages - 1` tiles ahead as cp.async
    # groups; the rest works on this tile.
    last = cfg.stages - 1
    n_rest = (3 if cfg.frag_prefetch else 1) + (0 if fp16_weight else 1)
    sch.annotate(k0, "software_pipeline_stage", [0, 0] + [last] * n_rest)
    sch.annotate(k0, "software_pipeline_order", list(range(2 + n_rest)))
    sch.annotate(k0, "software_pipeline_async_stages", [0])
    return sch.mod["main"]


# ---------------------------------------------------------------- CPU (llvm)


@dataclass(frozen=True)
class CpuConfig:
    block_n: int  # output columns per parallel task: two vector registers wide
    rows: int  # rows of x per register tile: rows x block_n fp32 accumulators stay in registers over all of K


def cpu_config(N: int, K: int, G: int, target: DeviceTarget) -> CpuConfig:
    lanes = max(4, target.vector_bytes // 4)
    # 6 rows x 2 vectors = 12 accumulators, 2 weight vectors and a broadcast: AVX2's 16 registers. SmolLM2's four
    # shapes at M = 512, 2 threads (`python benchmarks/kernels.py cpu-gemm -m 512 --configs ...` ->
    # gemm_cpu_tilings.json): 16 columns x 6 rows 17.6 ms a layer, x 4 19.0, x 2 30.7; 32 columns x 3 rows 26.3.
    # AVX-512 (cpu-avx512, 32 registers; gemm_cpu_tilings_avx512.json): 32 x 6 12.4, 32 x 8 12.1, 32 x 12 12.3.
    return CpuConfig(block_n=2 * lanes, rows=6)


def _cpu_kernel(N: int, K: int, G: int, cfg: CpuConfig):
    """y = x @ dequant(W)^T on llvm targets. A task per block_n output columns dequantizes its K x block_n
    panel of W once into fp32 (k-major: a row of the panel is two vector loads), then runs the rows of x
    through it `rows` at a time with the rows x block_n fp32 accumulators held in registers over all of K:
    per k, `rows` broadcasts of x (converted to fp32 once, before the tasks), two panel loads and 2 x rows
    FMAs. The schedule it replaced (panel of 256 k, one row at a time, accumulators in memory) reached
    55-83 GFLOP/s on 2 cores, this one 170-230 (benchmarks/results/gemm_cpu.json); the same arithmetic: fp32
    products and sums, one rounding to fp16."""
    from tvm.script import tirx as T

    BN, MI, KW, KG = cfg.block_n, cfg.rows, K // 8, K // G
    NB = -(-N // BN)

    @T.prim_func(s_tir=True)
    def gemm(x_handle: T.handle, weight: T.Buffer((N, KW), "uint32"), scales: T.Buffer((N, KG), "float16"),
             zeros: T.Buffer((N, KG), "float16"), y_handle: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        M = T.int64()
        x = T.match_buffer(x_handle, (M, K), "float16")
        y = T.match_buffer(y_handle, (M, N), "float16")
        with T.sblock("root"):
            xf = T.sblock_alloc_buffer((M, K), "float32")
            for m in T.parallel(M):
                with T.sblock("x_fp32"):
                    for k0 in T.serial(K // 8):  # 8 lanes at a time: a K-wide vector takes LLVM seconds to legalize
                        for k1 in T.vectorized(8):
                            xf[m, k0 * 8 + k1] = T.Cast("float32", x[m, k0 * 8 + k1])
            for nb in T.parallel(NB):
                with T.sblock("columns"):
                    T.reads(xf[0:M, 0:K], weight[0:N, 0:KW], scales[0:N, 0:KG], zeros[0:N, 0:KG])
                    T.writes(y[0:M, 0:N])
                    panel = T.sblock_alloc_buffer((K, BN), "float32")
                    rows = T.sblock_alloc_buffer((BN, K), "float32")
                    acc = T.sblock_alloc_buffer((MI, BN), "float32")
                    for c in T.serial(BN):
                        # columns past N (the last task) dequantize row N - 1 again and are not stored
                        n: T.let[T.int32] = T.min(nb * BN + c, N - 1)
                        for kw in T.serial(KW):
                            # a word's 8 nibbles as one vector: variable shifts, convert, (q - z) * s
                            for j in T.vectorized(8):
                                rows[c, kw * 8 + j] = (T.Cast("float32", T.bitwise_and(
                                    T.shift_right(weight[n, kw], T.Cast("uint32", j) * T.uint32(4)), T.uint32(15)))
                                    - T.Cast("float32", zeros[n, kw * 8 // G])) * T.Cast("float32", scales[n, kw * 8 // G])
                    for k in T.serial(K):  # k-major: a panel row is the block_n columns' weights at one k
                        for c in T.serial(BN):
                            panel[k, c] = rows[c, k]
                    for mo in T.serial(M // MI):
                        for mi in T.unroll(MI):
                            for c in T.vectorized(BN):
                                acc[mi, c] = T.float32(0)
                        for k in T.serial(K):
                            for mi in T.unroll(MI):
                                for c in T.vectorized(BN):
                                    acc[mi, c] = acc[mi, c] + xf[mo * MI + mi, k] * panel[k, c]
                        for mi in T.unroll(MI):
                            for c in T.serial(BN):
                                if nb * BN + c < N:
                                    y[mo * MI + mi, nb * BN + c] = T.Cast("float16", acc[mi, c])
                    for mt in T.serial(M % MI):  # the last rows, one at a time
                        for c in T.vectorized(BN):
                            acc[0, c] = T.float32(0)
                        for k in T.serial(K):
                            for c in T.vectorized(BN):
                                acc[0, c] = acc[0, c] + xf[M - M % MI + mt, k] * panel[k, c]
                        for c in T.serial(BN):
                            if nb * BN + c < N:
                                y[M - M % MI + mt, nb * BN + c] = T.Cast("float16", acc[0, c])

    return gemm


def gemm_w4a16(N: int, K: int, group_size: int, target, config: CudaConfig | CpuConfig | None = None):
    """A scheduled TIR PrimFunc with symbolic M: (x f16 [M, K], weight u32 [N, K/8], scales f16 [N, K/G],
    zeros f16 [N, K/G], y f16 [M, N]) for `target` (a name from tvm_kernels.targets or a DeviceTarget).
    `config` overrides the tiling (benchmarks sweep it). Hopper built as sm_90a gets the wgmma kernel of
    gemm_w4a16_sm90.py instead (unless a `config` asks for this one)."""
    N, K, group_size = int(N), int(K), int(group_size)
    _check_shape(N, K, group_size)
    t = get_target(target)
    if t.is_cuda:
        if t.sm < 80:
            raise UserError(f"gemm_w4a16: target {t.name} ({t.arch}) lacks sm_80 tensor cores")
        _check_tvm_ffi()
        from tvm_kernels import gemm_w4a16_sm90 as sm90

        if config is None and sm90.supports(N, K, group_size, t.arch):
            return sm90.gemm_w4a16_sm90(N, K, group_size, sm90.default_tilings(N, t.num_sms))
        cfg = config or cuda_config(N, K, t)
        if not valid_config(cfg):
            raise UserError(f"gemm_w4a16: CUDA config {cfg} is not buildable (see _staging_fits)")
        return _schedule_cuda(_compute(N, K, group_size), cfg)
    return _cpu_kernel(N, K, group_size, config or cpu_config(N, K, group_size, t))
