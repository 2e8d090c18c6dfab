"""Tensor-core prefill attention: its numpy reference against a per-query softmax loop, the launch
configuration (shared memory, rejected shapes and GPUs) and the CUDA builds for sm_90 and the Orin's sm_87
(real cubins). The kernel's numerics run on the GPU machine: `benchmarks/kernels.py build --attention-only`
+ the device script check it against torch float32 (ragged batch, a cached prefix, causal and not), and the
e2e device check compares whole CUDA exports with torch."""
import numpy as np
import pytest
from cuda_build import build_and_check_cubin

from tvm_kernels.errors import UserError
from tvm_kernels.prefill_attention import config, reference, supports
from tvm_kernels.targets import get_target


@pytest.mark.parametrize("causal", [True, False])
def test_reference_is_softmax_attention(causal):
    rng = np.random.default_rng(0)
    Lq, Lk, H_qo, H_kv, D = 5, 9, 6, 2, 16  # queries are the last 5 of 9 positions (a cached prefix of 4)
    q = rng.standard_normal((Lq, H_qo, D)).astype(np.float32)
    k = rng.standard_normal((Lk, H_kv, D)).astype(np.float32)
    v = rng.standard_normal((Lk, H_kv, D)).astype(np.float32)
    out, lse = reference(q, k, v, D ** -0.5, causal=causal)
    for i in range(Lq):
        seen = Lk - Lq + i + 1 if causal else Lk
        for h in range(H_qo):
            s = k[:seen, h // 3] @ q[i, h] * D ** -0.5
            p = np.exp(s - s.max())
            np.testing.assert_allclose(out[i, h], p @ v[:seen, h // 3] / p.sum(), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(lse[i, h] / np.log2(np.e), np.log(np.exp(s).sum()), rtol=1e-5)


@pytest.mark.parametrize("target", ["cuda-sm90", "cuda-sm86", "jetson-orin", "jetson-orin-nano", "cuda-sm120"])
@pytest.mark.parametrize("heads", [(32, 32, 128), (9, 3, 64), (32, 8, 128), (8, 1, 96), (4, 4, 16)])
def test_config_fits_static_shared_memory(target, heads):
    c = config(*heads, get_target(target))
    assert c["smem_bytes"] <= 48 * 1024 and c["bm"] == 16 * c["warps"] and 2 * c["bn"] >= c["bm"]
    assert (heads[2] // 16) % c["oj"] == 0


def test_bad_shapes():
    t = get_target("cuda-sm90")
    with pytest.raises(UserError, match="multiple"):
        config(9, 2, 64, t)
    for d in (72, 256):  # 256 (Gemma3) would spill the register accumulator: the export keeps TVM's kernel there
        assert not supports(8, 8, d)
        with pytest.raises(UserError, match=f"head_dim {d}"):
            config(8, 8, d, t)


@pytest.mark.parametrize("target,arch", [("cuda-sm90", "sm_90"), ("jetson-orin", "sm_87")])
def test_cuda_build(tmp_path, target, arch):
    build_and_check_cubin(tmp_path, target, arch, """
        from tvm_kernels.prefill_attention import prefill_attention
        funcs = {"pattn_mha": prefill_attention(32, 32, 128, t), "pattn_gqa": prefill_attention(3, 9, 64, t),
                 "pattn_paged": prefill_attention(3, 9, 64, t, page_size=16)}  # over the cached pages
    """)
