"""The llvm (CPU) decode GEMV against its numpy reference: every group size, odd shapes, M = 1, 3, 8."""
import numpy as np
import pytest

from tvm_kernels.errors import UserError
from tvm_kernels.gemv_w4a16 import gemv_w4a16, reference
from tvm_kernels.layout import random_quantized
from tvm_kernels.targets import get_target

tvm = pytest.importorskip("tvm")

CASES = [
    # (N, K, G, M): K not a multiple of 256 and N not a multiple of 64 included
    (64, 256, 32, 1),
    (100, 96, 32, 3),
    (130, 576, 64, 1),
    (576, 1536, 64, 8),
    (192, 384, 128, 3),
    (77, 640, 128, 8),
    (257, 128, 128, 1),
]


def _run(lib, x, w, s, z, N):
    y = np.full((x.shape[0], N), np.nan, np.float16)  # poison: every element must be written
    args = [tvm.runtime.tensor(a) for a in (x, w, s, z, y)]
    lib["main"](*args)
    return args[4].numpy()


@pytest.mark.parametrize("N,K,G,M", CASES)
def test_cpu_gemv_matches_reference(N, K, G, M):
    rng = np.random.default_rng(N * 1000 + K + M)
    w, s, z = random_quantized(N, K, G, rng)
    x = rng.standard_normal((M, K)).astype(np.float16)
    # the shipped CPU target (x86-64-v3: AVX2 + FMA), not a generic llvm
    lib = tvm.compile(tvm.IRModule({"main": gemv_w4a16(N, K, G, "cpu", M=M)}), target=get_target("cpu").tvm_target())
    out = _run(lib, x, w, s, z, N)
    assert np.isfinite(out).all()
    ref = reference(x, w, s, z, G)
    err = np.linalg.norm(out.astype(np.float32) - ref) / np.linalg.norm(ref)
    assert err < 2e-3, err  # fp32 accumulation, fp16 output rounding ~3e-4
    np.testing.assert_allclose(out.astype(np.float32), ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())


def test_reference_is_plain_matmul():
    rng = np.random.default_rng(3)
    N, K, G = 16, 64, 32
    q = rng.integers(0, 16, size=(N, K), dtype=np.uint8)
    z = rng.integers(0, 16, size=(N, K // G)).astype(np.float16)
    s = rng.random((N, K // G)).astype(np.float16)
    from tvm_kernels.layout import quantized_to_kernel_layout

    w, s16, z16 = quantized_to_kernel_layout(q, s, z)
    x = rng.standard_normal((2, K)).astype(np.float32)
    W = (q - np.repeat(z.astype(np.float32), G, 1)) * np.repeat(s.astype(np.float32), G, 1)
    np.testing.assert_allclose(reference(x, w, s16, z16, G), x @ W.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("args", [(64, 100, 32, 1), (64, 256, 48, 1), (64, 256, 64, 9), (64, 256, 64, 0)])
def test_bad_shapes_raise_user_error(args):
    N, K, G, M = args
    with pytest.raises(UserError):
        gemv_w4a16(N, K, G, "cpu", M=M)


def test_unknown_target_lists_names():
    with pytest.raises(UserError, match="jetson-orin"):
        gemv_w4a16(64, 256, 64, "tpu", M=1)


def test_kernel_modules_do_not_import_tvm():
    import subprocess
    import sys

    code = ("import sys, tvm_kernels.layout, tvm_kernels.targets, tvm_kernels.gemv_w4a16, tvm_kernels.cuda_env; "
            "sys.exit('tvm' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("target", ["cuda-sm90", "jetson-orin", "jetson-orin-nano", "cuda-sm86"])
def test_cuda_config_is_valid_for_decode_shapes(target):
    from tvm_kernels.gemv_w4a16 import cuda_config
    from tvm_kernels.targets import get_target

    t = get_target(target)
    for N, K in [(12288, 4096), (4096, 11008), (960, 576), (100, 96), (77, 640), (32000, 4096)]:
        for M in (1, 3, 8):
            c = cuda_config(N, K, M, t)
            assert c.tx in (4, 8, 16, 32) and c.rows in (1, 2, 4) and c.unroll in (1, 2, 4)
            assert c.tx * c.ty * c.ksplit <= t.max_threads_per_block
            assert c.tx * c.ksplit <= max(4, K // 32) or c.tx == 4  # no lane group without any chunk
