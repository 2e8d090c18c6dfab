"""The prefill GEMM: the llvm (CPU) kernel against its numpy reference for every group size, odd shapes
and M = 1, 3, 8, 17, 512 (one compiled kernel per shape serves every M); the portable CUDA kernel builds
for sm_89 and the Orin's sm_87 here without a GPU, into real cubins, using the tensor cores and a cp.async
pipeline (its numerics are checked on the GPU machine: benchmarks/gemm_sweep.py). Hopper (sm_90a) gets
the wgmma kernel instead: test_gemm_sm90.py."""
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tvm_kernels.errors import UserError
from tvm_kernels.gemm_w4a16 import CudaConfig, gemm_w4a16, reference, valid_config
from tvm_kernels.layout import quantized_to_kernel_layout, random_quantized

tvm = pytest.importorskip("tvm")
REPO = Path(__file__).resolve().parent.parent

CASES = [
    # (N, K, G): K not a multiple of 256 and N not a multiple of 64 included
    (100, 96, 32),
    (130, 576, 64),
    (64, 1536, 64),
    (77, 640, 128),
    (192, 384, 128),
]
MS = (1, 3, 8, 17, 512)


@pytest.mark.parametrize("N,K,G", CASES)
def test_cpu_gemm_matches_reference(N, K, G):
    lib = tvm.compile(tvm.IRModule({"main": gemm_w4a16(N, K, G, "cpu")}), target="llvm")
    rng = np.random.default_rng(N * 1000 + K)
    w, s, z = random_quantized(N, K, G, rng)
    for M in MS:
        x = rng.standard_normal((M, K)).astype(np.float16)
        y = np.full((M, N), np.nan, np.float16)  # poison: every element must be written
        args = [tvm.runtime.tensor(a) for a in (x, w, s, z, y)]
        lib["main"](*args)
        out = args[4].numpy().astype(np.float32)
        ref = reference(x, w, s, z, G)
        assert np.isfinite(out).all(), (M, N, K, G)
        err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
        assert err < 2e-3, (M, err)  # fp32 accumulation; fp16 output rounding is ~3e-4
        np.testing.assert_allclose(out, ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())


@pytest.mark.parametrize("target,fma", [("cpu", "vfmadd231ps\t%ymm"), ("cpu-aarch64", "fmla\tv")])
def test_cpu_gemm_register_tile_is_vector_fma(target, fma):
    """The llvm kernel's inner loop is vector FMAs for x86-64-v3 (AVX2) and the Jetson's CPU (NEON, built
    without a board: object code needs no cross linker)."""
    from tvm_kernels.targets import get_target

    t = get_target(target)
    with t.tvm_target() as tgt:
        lib = tvm.compile(tvm.IRModule({"main": gemm_w4a16(130, 576, 64, t)}), target=tgt)
    asm = lib.mod.inspect_source("asm")
    assert asm.count(fma) >= 12  # a 6 x 2 tile of accumulators: 12 FMAs per k


def test_reference_is_plain_matmul():
    rng = np.random.default_rng(5)
    N, K, G = 24, 128, 64
    q = rng.integers(0, 16, size=(N, K), dtype=np.uint8)
    z = rng.integers(0, 16, size=(N, K // G)).astype(np.float16)
    s = rng.random((N, K // G)).astype(np.float16)
    w, s16, z16 = quantized_to_kernel_layout(q, s, z)
    x = rng.standard_normal((5, K)).astype(np.float32)
    W = (q - np.repeat(z.astype(np.float32), G, 1)) * np.repeat(s.astype(np.float32), G, 1)
    np.testing.assert_allclose(reference(x, w, s16, z16, G), x @ W.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("args", [(64, 100, 32), (64, 256, 48), (0, 256, 64), (64, 96, 64)])
def test_bad_shapes_raise_user_error(args):
    with pytest.raises(UserError, match="gemm_w4a16"):
        gemm_w4a16(*args, "cpu")


def test_cuda_config_rules():
    # the planner bug workaround: an fp32 staging tile smaller than the x pipeline buffers does not build
    assert not valid_config(CudaConfig(warps_m=2, warps_n=2, frags_m=4, frags_n=2, chunk_k=4, stages=3))
    assert valid_config(CudaConfig(warps_m=2, warps_n=2, frags_m=4, frags_n=4, chunk_k=4, stages=3))
    # static + dynamic shared memory above 48 KB with the dynamic part below it would not launch
    assert not valid_config(CudaConfig(warps_m=2, warps_n=2, frags_m=2, frags_n=4, chunk_k=4, stages=3))
    assert not valid_config(CudaConfig(chunk_k=1))  # the packed weight copies move 16 bytes = 32 k per row
    with pytest.raises(UserError, match="not buildable"):
        gemm_w4a16(128, 576, 64, "cuda-sm90", config=CudaConfig(warps_m=2, warps_n=2, frags_m=4, frags_n=2))
    with pytest.raises(UserError, match="tensor cores|unknown target"):
        from tvm_kernels.targets import DeviceTarget

        gemm_w4a16(128, 576, 64, DeviceTarget(name="old", kind="cuda", target={"kind": "cuda"}, description="",
                                               arch="sm_75"))


@pytest.mark.parametrize("target", ["cuda-sm90", "jetson-orin", "jetson-orin-nano", "cuda-sm86", "cuda-sm89",
                                    "cuda-sm120"])
def test_cuda_config_fits_every_target(target):
    from tvm_kernels.gemm_w4a16 import _OPT_IN_SHARED, cuda_config
    from tvm_kernels.targets import get_target

    t = get_target(target)
    shapes = [(12288, 4096, 128), (4096, 4096, 128), (22016, 4096, 128), (4096, 11008, 128),  # Llama-2-7B
              (960, 576, 64), (576, 576, 64), (3072, 576, 64), (576, 1536, 64), (100, 96, 32), (77, 640, 128)]
    for N, K, G in shapes:
        for fragments in ("wmma", "mma"):
            c = cuda_config(N, K, t, fragments=fragments)
            assert valid_config(c) and c.fragments == fragments, (N, K, c)
            assert K % c.block_k == 0 and c.shared_bytes() <= _OPT_IN_SHARED[t.arch], (N, K, c)


def test_cuda_dequant_is_fused_not_materialized():
    # the dequantized weight lives only in shared-memory tiles: every buffer the kernel allocates has
    # an explicit on-chip scope (shared / shared.dyn / wmma fragments / local), none is global; the packed
    # words reach shared memory as they are (uint32) and are dequantized there
    script = gemm_w4a16(4096, 4096, 128, "cuda-sm89").script()  # sm_90a takes gemm_w4a16_sm90.py
    allocs = [line for line in script.splitlines() if "alloc_buffer(" in line]
    assert allocs and all('scope="' in line and 'scope="global"' not in line for line in allocs), allocs
    assert any('"uint32", scope="shared.dyn"' in line for line in allocs), allocs
    assert "wmma.matrix_b" in script and "software_pipeline_async_stages" in script


# One subprocess builds both archs (the stub libcuda and the nvcc callback stay out of pytest).
_BUILD = textwrap.dedent(
    """
    import sys
    from tvm_kernels.cuda_env import check_cubin, prepare_cuda_build, set_embed_ptx
    prepare_cuda_build()
    import re
    import tvm
    from tvm_kernels.gemm_w4a16 import (BUILD_CONFIG, MMA_BUILD_CONFIG, cuda_config, gemm_w4a16,
                                        mma_tir_pipeline)
    from tvm_kernels.targets import get_target
    out = sys.argv[1]
    for name, suffix, ptx in (("cuda-sm89", ".so", False), ("jetson-orin", ".tar", True)):
        t = get_target(name)
        set_embed_ptx(ptx)
        funcs = {"gemm_llama_o": gemm_w4a16(4096, 4096, 128, t), "gemm_odd": gemm_w4a16(100, 576, 64, t),
                 "gemm_g32": gemm_w4a16(960, 352, 32, t)}
        mod = tvm.IRModule({k: f.with_attr("global_symbol", k) for k, f in funcs.items()})
        with tvm.transform.PassContext(config=BUILD_CONFIG), t.tvm_target() as target:
            lib = tvm.compile(mod, target=target)
        src = lib.mod.imports[0].inspect_source()
        assert src.count("wmma::mma_sync") >= 3, "no tensor-core MMA in the generated CUDA"
        assert "wmma::load_matrix_sync" in src
        assert src.count("cp.async.cg.shared.global") >= 2, "no cp.async copies in the generated CUDA"
        path = out + "/" + name + suffix
        lib.export_library(path)
        print(name, check_cubin(path, t.arch, ptx=ptx))
        # the ldmatrix + mma.sync fragments, with their build settings
        f = gemm_w4a16(4096, 4096, 128, t, config=cuda_config(4096, 4096, t, fragments="mma"))
        f = f.with_attr("global_symbol", "gemm_mma")
        with tvm.transform.PassContext(config=MMA_BUILD_CONFIG), t.tvm_target() as target:
            lib = tvm.compile(tvm.IRModule({"gemm_mma": f}), target=target, tir_pipeline=mma_tir_pipeline())
        src = lib.mod.imports[0].inspect_source()
        assert "mma.sync.aligned.m16n8k16" in src and "ldmatrix.sync" in src, "no mma.sync / ldmatrix"
        # every fragment array lowered to the thread's own registers (a full-warp array means local memory)
        sizes = [int(n) for n in re.findall(r"_warp_ptr(?:_\\d+)?\\[(\\d+)\\];", src)]
        assert sizes and max(sizes) <= 128, sizes
        path = out + "/" + name + "_mma" + suffix
        lib.export_library(path)
        print(name, "mma", check_cubin(path, t.arch, ptx=ptx))
    """
)


def test_cuda_gemm_builds_sm89_and_sm87_with_mma(tmp_path):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed: CUDA builds need the CUDA toolkit")
    proc = subprocess.run([sys.executable, "-c", _BUILD, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cuda-sm89 [('cubin', 89)]" in proc.stdout and "cuda-sm89 mma [('cubin', 89)]" in proc.stdout
    assert "('cubin', 87)" in proc.stdout and "('ptx', 87)" in proc.stdout and "jetson-orin mma" in proc.stdout
