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


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_glu_reference_and_the_interleaved_layout(activation):
    # export interleaves gate_up's rows (gate_j, up_j); the gated GEMV's reference on that layout equals
    # act(x @ gate^T) * (x @ up^T) computed from the two halves as the checkpoint has them
    import torch

    from export.exporter import interleave_halves
    from tvm_kernels.gemv_w4a16 import reference_glu

    rng = np.random.default_rng(5)
    I, K, G = 24, 128, 32
    w, s, z = random_quantized(2 * I, K, G, rng)  # rows: gate_0..gate_23, up_0..up_23
    x = rng.standard_normal((1, K)).astype(np.float16)
    halves = reference(x, w, s, z, G)
    gate, up = torch.from_numpy(halves[:, :I]), torch.from_numpy(halves[:, I:])
    act = torch.nn.functional.silu(gate) if activation == "silu" else torch.nn.functional.gelu(gate, approximate="tanh")
    got = reference_glu(x, interleave_halves(w), interleave_halves(s), interleave_halves(z), G, activation)
    np.testing.assert_allclose(got, (act * up).numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="gated epilogue"):
        gemv_w4a16(2 * I, K, G, "cpu", glu="silu")
    with pytest.raises(UserError, match="gated epilogue"):
        gemv_w4a16(2 * I, K, G, "cuda-sm90", glu="relu")


def test_norm_prologue_feeds_what_the_norm_kernel_writes():
    # the decode GEMV's norm prologue replaces the add + RMSNorm kernel between two linears: its activations
    # are that kernel's output (tvm_kernels/fused_ops.reference, rounded to fp16 as the kernel stores it)
    from tvm_kernels import fused_ops
    from tvm_kernels.gemv_w4a16 import reference_norm

    rng = np.random.default_rng(9)
    x = (rng.standard_normal((3, 576)) * 5).astype(np.float16)
    gamma = (1 + 0.3 * rng.standard_normal(576)).astype(np.float16)
    want = fused_ops.reference(x, None, gamma, 1e-5)[0].astype(np.float16)
    np.testing.assert_array_equal(reference_norm(x, gamma, 1e-5), want)
    # and that is RMSNorm: float64 x / rms(x) * gamma within fp16 rounding
    x64 = x.astype(np.float64)
    rms = x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + 1e-5) * gamma.astype(np.float64)
    np.testing.assert_allclose(reference_norm(x, gamma, 1e-5).astype(np.float64), rms, rtol=1e-3, atol=1e-3)


def test_fused_neighbours_signatures_and_errors():
    # norm prologue: gamma after zeros; residual epilogue: r before y; CUDA only
    def names(f):
        return [p.name for p in f.params]

    assert names(gemv_w4a16(960, 576, 64, "cuda-sm90", norm_eps=1e-5)) == ["x", "weight", "scales", "zeros", "gamma", "y"]
    assert names(gemv_w4a16(576, 1536, 64, "cuda-sm90", residual=True)) == ["x", "weight", "scales", "zeros", "r_in", "y"]
    assert names(gemv_w4a16(576, 1536, 64, "cuda-sm90")) == ["x", "weight", "scales", "zeros", "y"]
    with pytest.raises(UserError, match="CUDA kernels; target cpu"):
        gemv_w4a16(960, 576, 64, "cpu", norm_eps=1e-5)
    with pytest.raises(UserError, match="do not combine"):
        gemv_w4a16(960, 576, 64, "cuda-sm90", glu="silu", residual=True)


def test_l2_prefetch_plan_and_signature():
    # what a decode GEMV prefetches of the next one: leading rows in steps of 16 within the budget, every region
    # a multiple of the bulk prefetch's 16 bytes; sm_90 only (measured there; no bulk prefetch before), none for a zero budget
    from tvm_kernels import gemv_w4a16 as g

    for N, K, G in ((22016, 4096, 128), (4096, 11008, 128), (576, 1536, 64), (100, 352, 32), (12288, 4096, 128)):
        plan = g.l2_prefetch_plan(N, K, G, "cuda-sm90", after_attention=False)
        row_bytes = K // 2 + 4 * (K // G)
        assert plan.rows % 16 == 0 and 0 < plan.rows <= N
        assert plan.rows * row_bytes <= g.PREFETCH_BYTES < (plan.rows + 16) * row_bytes or plan.rows == N - N % 16
        assert all(size % 16 == 0 for _, size in plan.regions())
        assert sum(size for _, size in plan.regions()) == plan.rows * row_bytes
    for target in ("cpu", "jetson-orin", "cuda-sm86", "cuda-sm89", "cuda-sm120"):
        assert g.l2_prefetch_plan(4096, 4096, 128, target, after_attention=False) is None
    assert (g.l2_prefetch_plan(4096, 4096, 128, "cuda-sm90", after_attention=True) is None) == (
        g.PREFETCH_AFTER_ATTENTION_BYTES == 0)
    f = gemv_w4a16(4096, 4096, 128, "cuda-sm90", residual=True, prefetch=g.L2Prefetch(22016, 4096, 128, 1024))
    assert [p.name for p in f.params] == ["x", "weight", "scales", "zeros", "r_in", "pf_w", "pf_s", "pf_z", "y"]
    assert [int(d) for d in f.params[5].shape] == [22016, 512]
    with pytest.raises(UserError, match="bulk prefetch; target jetson-orin"):
        gemv_w4a16(4096, 4096, 128, "jetson-orin", prefetch=g.L2Prefetch(4096, 4096, 128, 16))
    with pytest.raises(UserError, match="multiple of 16"):
        gemv_w4a16(4096, 4096, 128, "cuda-sm90", prefetch=g.L2Prefetch(4096, 4096, 128, 100))


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


def test_cuda_config_batch1_rules():
    # the H100 sweeps' picks at M = 1 (gemv_sweep_tiles_h100.json, gemv_sweep_small_h100.json)
    from tvm_kernels.gemv_w4a16 import cuda_config
    from tvm_kernels.targets import get_target

    t = get_target("cuda-sm90")
    pick = {name: cuda_config(N, K, 1, t) for name, N, K in
            (("7b_qkv", 12288, 4096), ("7b_down", 4096, 11008), ("gemma3_1b_down", 1152, 6912),
             ("llama32_1b_o", 2048, 2048), ("smollm2_down", 576, 1536))}
    assert (pick["7b_qkv"].rows, pick["7b_qkv"].ty, pick["7b_qkv"].ksplit) == (4, 2, 1)
    assert (pick["7b_down"].rows, pick["7b_down"].ksplit, pick["7b_down"].unroll) == (2, 2, 1)
    for name in ("gemma3_1b_down", "llama32_1b_o"):  # short matrices, long K: K over four warps
        assert (pick[name].rows, pick[name].ty, pick[name].ksplit, pick[name].unroll) == (2, 2, 4, 1)
    assert pick["smollm2_down"].ksplit == 1  # K < 2048 keeps the general rule


# ---------------------------------------------------------------------------------------------
# The CPU attention kernels that export/cpu_schedule.py swaps in for TVM's paged-KV-cache ones
# (same signatures), against numpy. Stale NaN rows in the last page must never reach the output.

ATT_H, ATT_HK, ATT_D, ATT_PAGE = 9, 3, 64, 16  # SmolLM2's heads


def _cpu_lib(func):
    return tvm.compile(tvm.IRModule({"main": func}), target=get_target("cpu").tvm_target())


@pytest.mark.parametrize("L", [1, 16, 17, 130, 700])
def test_cpu_decode_attention_matches_reference(L):
    from export.cpu_schedule import decode_attention_cpu
    from tvm_kernels.decode_attention import reference as decode_attention_reference

    rng = np.random.default_rng(L)
    n_pages = -(-L // ATT_PAGE)
    pages = np.full((n_pages + 3, 2, ATT_HK, ATT_PAGE, ATT_D), np.nan, np.float16)
    order = rng.permutation(n_pages + 3)[:n_pages].astype(np.int32)  # pages out of order
    k = rng.standard_normal((L, ATT_HK, ATT_D)).astype(np.float16)
    v = rng.standard_normal((L, ATT_HK, ATT_D)).astype(np.float16)
    for t in range(L):
        pages[order[t // ATT_PAGE], 0, :, t % ATT_PAGE] = k[t]
        pages[order[t // ATT_PAGE], 1, :, t % ATT_PAGE] = v[t]
    q = (rng.standard_normal((1, ATT_H, ATT_D)) * 2).astype(np.float16)
    last = L - (n_pages - 1) * ATT_PAGE
    args = [tvm.runtime.tensor(a) for a in (
        q, pages, np.array([0, n_pages], np.int32), order, np.array([last], np.int32), np.zeros(1, np.int32),
        np.zeros(1, np.int32), np.zeros((1, ATT_H, ATT_D), np.float16), np.zeros((1, ATT_H), np.float32))]
    _cpu_lib(decode_attention_cpu(ATT_H, ATT_HK, ATT_D, ATT_PAGE))["main"](*args, 0, 1.0, 1e4, ATT_D ** -0.5)
    out, lse = decode_attention_reference(q[0], k, v, ATT_D ** -0.5)
    np.testing.assert_allclose(args[7].numpy()[0].astype(np.float32), out, atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(args[8].numpy()[0], lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("heads", [(ATT_H, ATT_HK, ATT_D), (4, 4, 128), (14, 2, 64), (2, 1, 24)])  # groups 3, 1, 7, 2
@pytest.mark.parametrize("q_len,kv_len,causal", [(1, 1, 1), (37, 37, 1), (20, 33, 1), (7, 9, 0)])
def test_cpu_prefill_attention_matches_reference(q_len, kv_len, causal, heads):
    from export.cpu_schedule import prefill_attention_cpu
    from tvm_kernels.decode_attention import reference as decode_attention_reference

    H, HK, D = heads
    rng = np.random.default_rng(q_len * 100 + kv_len)
    q = rng.standard_normal((q_len, H, D)).astype(np.float16)
    k = rng.standard_normal((kv_len, HK, D)).astype(np.float16)
    v = rng.standard_normal((kv_len, HK, D)).astype(np.float16)
    args = [tvm.runtime.tensor(a) for a in (
        q, np.array([0, q_len], np.int32), k, v, np.array([0, kv_len], np.int32), np.zeros(q_len, np.int32),
        np.zeros(1, np.int32), np.zeros((q_len, H, D), np.float16), np.zeros((q_len, H), np.float32))]
    _cpu_lib(prefill_attention_cpu(H, HK, D))["main"](*args, causal, 0, 1.0, 1e4, D ** -0.5)
    for i in range(q_len):
        seen = min(kv_len, kv_len - q_len + i + 1) if causal else kv_len  # TVM's causal mask
        out, lse = decode_attention_reference(q[i], k[:seen], v[:seen], D ** -0.5)
        np.testing.assert_allclose(args[7].numpy()[i].astype(np.float32), out, atol=2e-3, rtol=2e-3)
        np.testing.assert_allclose(args[8].numpy()[i], lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("q_len,kv_len,causal", [(5, 130, 0), (37, 200, 1), (1, 17, 0)])
def test_cpu_paged_prefill_attention_matches_reference(q_len, kv_len, causal):
    """The paged variant (a chunk against cached tokens): pages out of order, a partly filled last page."""
    from export.cpu_schedule import prefill_attention_cpu
    from tvm_kernels.decode_attention import reference as decode_attention_reference

    rng = np.random.default_rng(q_len + kv_len)
    n_pages = -(-kv_len // ATT_PAGE)
    pages = np.full((n_pages + 3, 2, ATT_HK, ATT_PAGE, ATT_D), np.nan, np.float16)
    order = rng.permutation(n_pages + 3)[:n_pages].astype(np.int32)
    k = rng.standard_normal((kv_len, ATT_HK, ATT_D)).astype(np.float16)
    v = rng.standard_normal((kv_len, ATT_HK, ATT_D)).astype(np.float16)
    for t in range(kv_len):
        pages[order[t // ATT_PAGE], :, :, t % ATT_PAGE] = np.stack([k[t], v[t]])
    q = rng.standard_normal((q_len, ATT_H, ATT_D)).astype(np.float16)
    last = kv_len - (n_pages - 1) * ATT_PAGE
    args = [tvm.runtime.tensor(a) for a in (
        q, np.array([0, q_len], np.int32), pages, np.array([0, n_pages], np.int32), order,
        np.array([last], np.int32), np.zeros(1, np.int32), np.zeros(q_len, np.int32),
        np.zeros((q_len, ATT_H, ATT_D), np.float16), np.zeros((q_len, ATT_H), np.float32))]
    _cpu_lib(prefill_attention_cpu(ATT_H, ATT_HK, ATT_D, page_size=ATT_PAGE))["main"](*args, causal, 0, 1.0, 1e4,
                                                                                    ATT_D ** -0.5)
    for i in range(q_len):
        seen = min(kv_len, kv_len - q_len + i + 1) if causal else kv_len  # TVM's causal mask
        out, lse = decode_attention_reference(q[i], k[:seen], v[:seen], ATT_D ** -0.5)
        np.testing.assert_allclose(args[8].numpy()[i].astype(np.float32), out, atol=2e-3, rtol=2e-3)
        np.testing.assert_allclose(args[9].numpy()[i], lse, atol=1e-4, rtol=1e-5)


def test_cpu_prefill_attention_two_sequences():
    """A ragged batch: each sequence attends only to its own keys, with its own causal offset."""
    from export.cpu_schedule import prefill_attention_cpu
    from tvm_kernels.decode_attention import reference as decode_attention_reference

    rng = np.random.default_rng(11)
    qi, ki = np.array([0, 13, 40], np.int32), np.array([0, 20, 47], np.int32)  # 13 / 27 queries, 20 / 27 keys
    q = rng.standard_normal((40, ATT_H, ATT_D)).astype(np.float16)
    k = rng.standard_normal((47, ATT_HK, ATT_D)).astype(np.float16)
    v = rng.standard_normal((47, ATT_HK, ATT_D)).astype(np.float16)
    args = [tvm.runtime.tensor(a) for a in (
        q, qi, k, v, ki, np.zeros(40, np.int32), np.zeros(2, np.int32),
        np.zeros((40, ATT_H, ATT_D), np.float16), np.zeros((40, ATT_H), np.float32))]
    _cpu_lib(prefill_attention_cpu(ATT_H, ATT_HK, ATT_D))["main"](*args, 1, 0, 1.0, 1e4, ATT_D ** -0.5)
    for s in range(2):
        qlen, klen = qi[s + 1] - qi[s], ki[s + 1] - ki[s]
        for i in range(qlen):
            seen = min(klen, klen - qlen + i + 1)
            out, lse = decode_attention_reference(q[qi[s] + i], k[ki[s]:ki[s] + seen], v[ki[s]:ki[s] + seen], ATT_D ** -0.5)
            np.testing.assert_allclose(args[7].numpy()[qi[s] + i].astype(np.float32), out, atol=2e-3, rtol=2e-3)
            np.testing.assert_allclose(args[8].numpy()[qi[s] + i], lse, atol=1e-4, rtol=1e-5)
