"""The Hopper (sm_90a) wgmma prefill GEMM: the per-thread dequantize (byte_perm / lop3 / fp16 fma bit tricks)
and the fragment mapping modelled in numpy against the dequantized reference, the dispatch from gemm_w4a16,
and an sm_90a build into a real cubin holding both tile configurations. Its numerics on the GPU are checked
by benchmarks/gemm_sm90.py (H100 / H200)."""
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tvm_kernels.gemm_w4a16_sm90 import (BK, LARGE, SMALL, TINY, Sm90Config, default_tilings, large_threshold,
                                         reference, small_threshold, supports)
from tvm_kernels.layout import dequantize_kernel_layout, random_quantized
from tvm_kernels.targets import get_target

REPO = Path(__file__).resolve().parent.parent


def _h(bits: int) -> float:
    return float(np.array([bits], dtype=np.uint16).view(np.float16)[0])


def _bits(v: float) -> int:
    return int(np.array([v], dtype=np.float16).view(np.uint16)[0])


def _deq2(word: int, t: int, z: float, s: float) -> tuple[float, float]:
    """awq_deq2 step by step: byte t -> half2(1024 + q0, 1024 + 16 q1) -> fma(., (1, 1/16), (-(1024+z), -(64+z)))
    (one rounding) -> * s (one rounding)."""
    u = (word >> (8 * t)) & 0xFF
    u = u | (u << 16)  # __byte_perm(w, 0, 0x4040 | t | t << 8): byte t at bytes 0 and 2
    h = (u & 0x00F0000F) | 0x64006400
    lo, hi = _h(h & 0xFFFF), _h(h >> 16)
    zf = (float(np.float16(-(1024 + z))), float(np.float16(-(64 + z))))
    v = (float(np.float16(lo * 1.0 + zf[0])), float(np.float16(hi * _h(0x2C00) + zf[1])))
    return float(np.float16(v[0] * s)), float(np.float16(v[1] * s))


def _fragments_to_tile(weight, scales, zeros, G, ko, rows):
    """Assemble W[rows, 64] of stage ko from what every thread's 16 A-fragment registers hold (awq_dequant_stage),
    placed by wgmma's register layout for A (per warp as mma.m16n8k16: reg j -> row g + 8 (j % 2),
    k 2t + 8 (j // 2), two halves), four k16 slices per stage."""
    tile = np.full((rows, BK), np.nan)
    for tid in range(rows * 2):  # 64 rows per warpgroup of 128 threads
        lane, warp = tid % 32, tid // 32
        g, t = lane // 4, lane % 4
        r0 = warp * 16 + g
        for s in range(4):
            grp = (ko * BK + 16 * s) // G
            for j in range(4):
                row = r0 + 8 * (j % 2)
                word = int(weight[row, ko * 8 + 2 * s + j // 2])
                a0, a1 = _deq2(word, t, float(zeros[row, grp]), float(scales[row, grp]))
                k = 16 * s + 2 * t + 8 * (j // 2)
                tile[row, k], tile[row, k + 1] = a0, a1
    return tile


@pytest.mark.parametrize("G", [32, 64, 128])
def test_fragment_dequantize_model_matches_reference(G):
    rng = np.random.default_rng(G)
    N, K = 128, 256
    w, s, z = random_quantized(N, K, G, rng)
    want = dequantize_kernel_layout(w, s, z, G).astype(np.float16).astype(np.float64)  # one fp16 rounding
    for ko in range(K // BK):
        got = _fragments_to_tile(w, s, z, G, ko, N)
        np.testing.assert_array_equal(got, want[:, ko * BK:(ko + 1) * BK])


def test_deq2_is_exact_for_every_nibble_and_zero():
    for q0 in range(16):
        for q1 in range(16):
            for zp in range(16):
                word = (q0 | q1 << 4) << 16  # byte 2
                got = _deq2(word, 2, zp, _h(_bits(0.0137)))
                s = _h(_bits(0.0137))
                assert got == (float(np.float16((q0 - zp) * s)), float(np.float16((q1 - zp) * s)))


def test_reference_is_plain_matmul():
    rng = np.random.default_rng(0)
    w, s, z = random_quantized(64, 128, 64, rng)
    x = rng.standard_normal((5, 128)).astype(np.float16)
    np.testing.assert_allclose(reference(x, w, s, z, 64), x.astype(np.float32) @ dequantize_kernel_layout(w, s, z, 64).T,
                               rtol=1e-6)


def test_supports_and_dispatch():
    assert get_target("cuda-sm90").arch == "sm_90a"
    assert supports(4096, 4096, 128, "sm_90a") and supports(960, 576, 64, "sm_90a")
    assert not supports(4096, 4096, 128, "sm_90")  # plain sm_90 has no wgmma
    assert not supports(4096, 4096, 128, "sm_87")
    assert not supports(100, 576, 64, "sm_90a") and not supports(4096, 4000, 32, "sm_90a")
    # the large tiles start where there are about two of them per SM, the tiny ones serve grids of 128 x 128
    # tiles that would occupy at most half the SMs
    assert large_threshold(22016, 132) == 512 and large_threshold(12288, 132) == 768
    assert large_threshold(4096, 132) == 2048 and large_threshold(960, 132) > 2048
    assert small_threshold(4096, 132) == 257 and small_threshold(12288, 132) == 1
    assert default_tilings(4096, 132) == [(0, TINY), (257, SMALL), (2048, LARGE)]
    assert default_tilings(12288, 132) == [(0, SMALL), (768, LARGE)]
    for cfg in (TINY, SMALL, LARGE):
        assert cfg.smem_bytes() <= 227 * 1024 and cfg.tokens * (cfg.rows + 8) * 2 <= cfg.smem_bytes()


def test_gemm_w4a16_picks_the_wgmma_kernel_on_sm90a():
    from tvm_kernels.gemm_w4a16 import CudaConfig, gemm_w4a16

    f = gemm_w4a16(4096, 4096, 128, "cuda-sm90")
    assert f.attrs["awq_edge.kernel"] == "gemm_w4a16_sm90"
    # an explicit tiling asks for the portable kernel; so does a shape the wgmma tiling does not take
    assert "awq_edge.kernel" not in (gemm_w4a16(4096, 4096, 128, "cuda-sm90", config=CudaConfig()).attrs or {})
    assert "awq_edge.kernel" not in (gemm_w4a16(100, 576, 64, "cuda-sm90").attrs or {})


def test_bad_config_raises_user_error():
    from tvm_kernels.errors import UserError
    from tvm_kernels.gemm_w4a16_sm90 import gemm_w4a16_sm90

    with pytest.raises(UserError, match="K % 64"):
        gemm_w4a16_sm90(128, 96, 32)
    with pytest.raises(UserError, match="does not fit"):
        gemm_w4a16_sm90(128, 128, 32, [(0, Sm90Config(4, 256, 8))])
    with pytest.raises(UserError, match="start at 0 tokens and ascend"):
        gemm_w4a16_sm90(128, 128, 32, [(0, SMALL), (0, LARGE)])


_BUILD = textwrap.dedent(
    """
    import sys
    from tvm_kernels.cuda_env import check_cubin, prepare_cuda_build
    prepare_cuda_build()
    import tvm
    from tvm_kernels.gemm_w4a16 import BUILD_CONFIG, gemm_w4a16
    from tvm_kernels.targets import get_target
    t = get_target("cuda-sm90")
    funcs = {"gemm_o": gemm_w4a16(4096, 4096, 128, t), "gemm_smol": gemm_w4a16(960, 576, 64, t),
             "gemm_g32": gemm_w4a16(256, 512, 32, t)}
    mod = tvm.IRModule({k: f.with_attr("global_symbol", k) for k, f in funcs.items()})
    with tvm.transform.PassContext(config=BUILD_CONFIG), t.tvm_target() as target:
        lib = tvm.compile(mod, target=target)
    src = lib.mod.imports[0].inspect_source()
    # each PrimFunc launches one of three kernels (the tilings) chosen on the host by M
    for k in funcs:
        for i in ("", "_1", "_2"):
            assert src.count(f" {k}_kernel{i}(") == 2, (k, i)  # declaration and definition
        assert f" {k}_kernel_3(" not in src, k
    assert "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16" in src
    assert "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16" in src
    assert "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16" in src
    assert "cp.async.cg.shared.global" in src and "fence.proxy.async.shared::cta" in src
    path = sys.argv[1] + "/sm90a.so"
    lib.export_library(path)
    print("cubins", check_cubin(path, t.arch))
    """
)


def test_sm90a_build_holds_a_cubin(tmp_path):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed: CUDA builds need the CUDA toolkit")
    proc = subprocess.run([sys.executable, "-c", _BUILD, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cubins [('cubin', 90)]" in proc.stdout
