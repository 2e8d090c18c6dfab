"""The kernel weight layout against the AutoAWQ checkpoint layout (pure numpy)."""
import numpy as np
import pytest

from tvm_kernels.awq_layout import dequantize_awq, pack_awq
from tvm_kernels.errors import UserError
from tvm_kernels.layout import (
    dequantize_kernel_layout,
    pack_kernel_weight,
    quantized_to_kernel_layout,
    repack_awq,
    unpack_kernel_weight,
)


def _awq_tensors(rng, K, N, G):
    q = rng.integers(0, 16, size=(K, N))
    z = rng.integers(0, 16, size=(K // G, N))
    s = (rng.random((K // G, N)) * 0.05 + 0.001).astype(np.float16)
    return q, z, s, pack_awq(q), pack_awq(z), s


@pytest.mark.parametrize("K,N,G", [(64, 8, 32), (576, 960, 64), (384, 200, 128), (96, 24, 32)])
def test_repack_matches_awq_dequant(K, N, G):
    rng = np.random.default_rng(K * 7 + N)
    q, z, s, qweight, qzeros, scales = _awq_tensors(rng, K, N, G)
    weight, ks, kz = repack_awq(qweight, qzeros, scales, G)
    assert weight.dtype == np.uint32 and weight.shape == (N, K // 8)
    assert ks.dtype == np.float16 and ks.shape == (N, K // G)
    assert kz.dtype == np.float16 and kz.shape == (N, K // G)
    ref = dequantize_awq(qweight, qzeros, scales, G)  # W^T [K, N]
    np.testing.assert_array_equal(dequantize_kernel_layout(weight, ks, kz, G), ref.T)
    # the integer values survive exactly too
    np.testing.assert_array_equal(unpack_kernel_weight(weight), q.T)
    np.testing.assert_array_equal(kz, z.T.astype(np.float16))


def test_nibble_order_is_plain():
    # q[n, 8w + j] lives in bits 4j..4j+3 of word [n, w]
    q = np.arange(16, dtype=np.uint8).reshape(1, 16)
    w = pack_kernel_weight(q)
    assert w.tolist() == [[0x76543210, 0xFEDCBA98]]


def test_quantized_to_kernel_layout_roundtrip():
    rng = np.random.default_rng(0)
    N, K, G = 33, 128, 64
    q = rng.integers(0, 16, size=(N, K), dtype=np.uint8)
    z = rng.integers(0, 16, size=(N, K // G))
    s = rng.random((N, K // G)).astype(np.float16)
    w, ks, kz = quantized_to_kernel_layout(q, s, z)
    expect = (q.astype(np.float32) - np.repeat(z, G, 1)) * np.repeat(s.astype(np.float32), G, 1)
    np.testing.assert_array_equal(dequantize_kernel_layout(w, ks, kz, G), expect)


def test_bad_inputs_raise_user_error():
    rng = np.random.default_rng(1)
    _, _, _, qweight, qzeros, scales = _awq_tensors(rng, 128, 16, 64)
    with pytest.raises(UserError):
        repack_awq(qweight, qzeros, scales, 128)  # group disagrees with qzeros rows
    with pytest.raises(UserError):
        repack_awq(qweight, qzeros, scales, 48)  # not a divisor of K
    with pytest.raises(UserError):
        pack_kernel_weight(np.full((2, 8), 16))
    with pytest.raises(UserError):
        quantized_to_kernel_layout(np.zeros((4, 64), np.uint8), np.ones((4, 2)), np.full((4, 2), 3.5))
