"""The INT8 lm_head GEMV (tvm_kernels/gemv_w8a16.py) against its numpy reference: odd shapes, every group
size, M = 1, 3, 8, 17 (one compiled kernel: M is symbolic); the quantizer's error bound; the aarch64
build; the CUDA kernel's byte-to-float conversion, and a CUDA export with the INT8 lm_head."""
import numpy as np
import pytest

from tvm_kernels.errors import UserError
from tvm_kernels.gemv_w8a16 import QMAX, dequantize, gemv_w8a16, quantize, reference

tvm = pytest.importorskip("tvm")

CASES = [
    # (N, K, G): N not a multiple of the rows per task (16) or per step (4), K not a power of two
    (37, 96, 32),
    (130, 576, 32),
    (1001, 192, 64),
    (64, 384, 128),
    (5, 64, 32),
]
MS = (1, 3, 8, 17)


def _build(N, K, G, target="cpu"):
    from tvm_kernels.targets import get_target

    return tvm.compile(tvm.IRModule({"main": gemv_w8a16(N, K, G, target)}), target=get_target(target).tvm_target())


@pytest.mark.parametrize("N,K,G", CASES)
def test_cpu_gemv_w8a16_matches_reference(N, K, G):
    rng = np.random.default_rng(N * 7 + K + G)
    q, s = quantize(rng.standard_normal((N, K)).astype(np.float32) * 0.05, G)
    lib = _build(N, K, G)  # the shipped CPU target (x86-64-v3: AVX2 + FMA)
    for M in MS:
        x = rng.standard_normal((M, K)).astype(np.float16)
        y = np.full((M, N), np.nan, np.float32)  # poison: every element must be written
        args = [tvm.runtime.tensor(a) for a in (x, q, s, y)]
        lib["main"](*args)
        out = args[3].numpy()
        assert np.isfinite(out).all(), M
        ref = reference(x, q, s, G)
        # float32 accumulation in another order: rounding only
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max(), err_msg=f"M={M}")


def test_quantize_error_bound_and_zero_groups():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 128)).astype(np.float32)
    w[3, 32:64] = 0  # an all-zero group
    w[5, :] *= 1e3  # large rows stay within int8 with their own scales
    for G in (32, 64, 128):
        q, s = quantize(w, G)
        assert q.dtype == np.int8 and s.dtype == np.float16 and s.shape == (8, 128 // G)
        assert np.abs(q.astype(np.int32)).max() <= QMAX
        err = np.abs(dequantize(q, s, G) - w)
        bound = np.repeat(s.astype(np.float32), G, axis=1) / 2 + 1e-7  # round to nearest of the fp16 scale
        assert (err <= bound * 1.001).all(), G
    q, s = quantize(w, 32)
    assert (q[3, 32:64] == 0).all() and s[3, 1] == 0


def test_reference_is_plain_matmul():
    rng = np.random.default_rng(2)
    q = rng.integers(-127, 128, size=(6, 64)).astype(np.int8)
    s = rng.random((6, 2)).astype(np.float16)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    W = q.astype(np.float32) * np.repeat(s.astype(np.float32), 32, axis=1)
    np.testing.assert_allclose(reference(x, q, s, 32), x @ W.T, rtol=1e-5, atol=1e-5)


def test_aarch64_build():
    """cpu-aarch64 (NEON): the same kernel compiles (no cross linker needed for the object code) and
    vectorizes: the widening int8 loads and fused multiply-adds are NEON instructions."""
    lib = _build(130, 576, 32, "cpu-aarch64")
    asm = lib.mod.inspect_source("asm")
    assert "fmla" in asm and "scvtf" in asm


@pytest.mark.parametrize("args", [(64, 100, 32), (64, 256, 48), (0, 256, 32)])
def test_bad_shapes_raise_user_error(args):
    with pytest.raises(UserError):
        gemv_w8a16(*args, "cpu")


def test_cuda_byte_to_float_is_exact():
    """The CUDA kernel's conversion (awq_i8_dot4), emulated for every int8: XOR 0x80, the byte under the exponent
    bits of 2^23 (0x4B0000bb), minus 2^23 + 128 in float32 gives q exactly."""
    q = np.arange(-128, 128, dtype=np.int32)
    u = (q.astype(np.uint32) & 0xFF) ^ 0x80
    f = (np.uint32(0x4B000000) | u).view(np.float32) - np.float32(8388736.0)
    assert f.dtype == np.float32 and (f == q).all()


@pytest.mark.cuda_build
def test_cuda_export_with_int8_lm_head(tmp_path):
    """`export --lm-head int8` for sm_90: the artifact holds a cubin and says so in its manifest (the kernel's
    numerics are checked on the GPU: benchmarks/kernels.py build --fused-only, and tiny models against
    transformers in benchmarks/families_gpu.py)."""
    import json
    import shutil
    import sys
    from pathlib import Path

    from tvm_kernels.cuda_env import check_cubin

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_export import _cli, make_checkpoint

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed")
    make_checkpoint("llama", tmp_path / "ckpt", awq=True)
    art = tmp_path / "art"
    proc = _cli("export", tmp_path / "ckpt", "--target", "cuda-sm90", "--out", art, "--context-length", "64",
                "--lm-head", "int8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_cubin(art / "model.so", "sm_90a")
    man = json.loads((art / "manifest.json").read_text())
    assert man["model"]["lm_head"] == "int8" and man["model"]["lm_head_group_size"] == 32
    assert {p["name"]: p["dtype"] for p in man["params"]}["model.embed_tokens.weight"] == "int8"  # tied: one table


def test_export_int8_lm_head_bad_hidden_size(tmp_path, capsys):
    """A hidden size the INT8 groups do not divide: one line naming the flag, nothing written, before anything
    is built."""
    from awq_edge.cli import main

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 48, '
                                      '"num_attention_heads": 2, "num_hidden_layers": 1, '
                                      '"intermediate_size": 128, "vocab_size": 32}')
    out = tmp_path / "art"
    code = main(["export", str(ckpt), "--target", "cpu", "--out", str(out), "--lm-head", "int8"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "--lm-head int8" in err and "48" in err and len(err.splitlines()) == 1, err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["ckpt"]
