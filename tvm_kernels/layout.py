"""The W4A16 kernel weight layout (one copy of the weights shared by the GEMV and the GEMM). Pure numpy.

For a linear y[M, N] = x[M, K] @ W^T with W[n, k] = (q[n, k] - z[n, k // G]) * s[n, k // G]:
  weight uint32  [N, K/8]: bits 4j..4j+3 of word [n, w] hold q[n, 8w + j]
  scales float16 [N, K/G]
  zeros  float16 [N, K/G]  (the integer zero point, exact in fp16)

Why K-contiguous rows in plain nibble order: a decode GEMV reads each output row's weights as one
stream, so a thread's 16-byte load is 32 consecutive k of one row (coalesced across the warp along K),
and nibble j of a word is simply `(w >> 4j) & 15` with no permutation table. The AutoAWQ checkpoint
(N-contiguous, interleaved nibble order) is repacked once, at export.
"""
from __future__ import annotations

import numpy as np

from tvm_kernels.awq_layout import unpack_awq
from tvm_kernels.errors import UserError

# Group sizes the kernels are built and tested for (the quantizer CLI and export accept only these).
GROUP_SIZES = (32, 64, 128)


def _check_group(K: int, group_size: int, what: str) -> None:
    if group_size <= 0 or group_size % 8 or K % group_size:
        raise UserError(f"{what}: K={K} must be a multiple of the group size {group_size} (itself a multiple of 8)")


def pack_kernel_weight(q: np.ndarray) -> np.ndarray:
    """uint [N, K] values in [0, 15] -> uint32 [N, K/8], nibble j of word w = q[:, 8w + j]."""
    q = np.asarray(q)
    if q.ndim != 2 or q.shape[1] % 8:
        raise UserError(f"pack_kernel_weight: expected [N, K] with K a multiple of 8, got {q.shape}")
    if q.size and (q.min() < 0 or q.max() > 15):
        raise UserError("pack_kernel_weight: values must lie in [0, 15]")
    v = q.astype(np.uint32).reshape(q.shape[0], -1, 8)
    shifts = (np.arange(8, dtype=np.uint32) * 4)[None, None, :]
    return np.bitwise_or.reduce(v << shifts, axis=2)


def unpack_kernel_weight(weight: np.ndarray) -> np.ndarray:
    """uint32 [N, K/8] -> uint8 [N, K]."""
    w = np.ascontiguousarray(weight).view(np.uint32)
    shifts = (np.arange(8, dtype=np.uint32) * 4)[None, None, :]
    return ((w[:, :, None] >> shifts) & 0xF).astype(np.uint8).reshape(w.shape[0], -1)


def quantized_to_kernel_layout(intweight: np.ndarray, scales: np.ndarray, zeros: np.ndarray):
    """Integer weights [N, K] (0..15), scales [N, K/G], integer zeros [N, K/G] -> (weight, scales, zeros)."""
    intweight = np.asarray(intweight)
    N, K = intweight.shape
    scales, zeros = np.asarray(scales), np.asarray(zeros)
    if scales.shape != zeros.shape or scales.ndim != 2 or scales.shape[0] != N or scales.shape[1] == 0:
        raise UserError(f"quantized_to_kernel_layout: scales {scales.shape} / zeros {zeros.shape} do not fit weight {intweight.shape}")
    if K % scales.shape[1]:
        raise UserError(f"quantized_to_kernel_layout: K={K} is not a multiple of the {scales.shape[1]} groups")
    _check_group(K, K // scales.shape[1], "quantized_to_kernel_layout")
    if zeros.size and (np.any(zeros < 0) or np.any(zeros > 15) or np.any(zeros != np.round(zeros))):
        raise UserError("quantized_to_kernel_layout: zeros must be integers in [0, 15]")
    return (
        pack_kernel_weight(intweight),
        np.ascontiguousarray(scales, dtype=np.float16),
        np.ascontiguousarray(zeros, dtype=np.float16),
    )


def repack_awq(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, group_size: int):
    """AutoAWQ GEMM tensors (qweight int32 [K, N/8], qzeros int32 [K/G, N/8], scales f16 [K/G, N])
    -> kernel layout (weight uint32 [N, K/8], scales f16 [N, K/G], zeros f16 [N, K/G])."""
    q = unpack_awq(qweight)  # [K, N]
    z = unpack_awq(qzeros)  # [K/G, N]
    s = np.asarray(scales)
    K, N = q.shape
    _check_group(K, group_size, "repack_awq")
    if z.shape != (K // group_size, N) or s.shape != (K // group_size, N):
        raise UserError(
            f"repack_awq: AWQ tensors disagree: qweight {np.shape(qweight)}, qzeros {np.shape(qzeros)}, "
            f"scales {s.shape}, group {group_size}"
        )
    return quantized_to_kernel_layout(np.ascontiguousarray(q.T), s.T, z.T)


def dequantize_kernel_layout(weight: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int) -> np.ndarray:
    """Kernel layout -> float32 W [N, K]."""
    q = unpack_kernel_weight(weight).astype(np.float32)
    N, K = q.shape
    s = np.asarray(scales, dtype=np.float32)
    z = np.asarray(zeros, dtype=np.float32)
    _check_group(K, group_size, "dequantize_kernel_layout")
    if s.shape != (N, K // group_size) or z.shape != s.shape:
        raise UserError(f"dequantize_kernel_layout: weight {np.shape(weight)}, scales {s.shape}, zeros {z.shape}, group {group_size} disagree")
    return (q - np.repeat(z, group_size, axis=1)) * np.repeat(s, group_size, axis=1)


def random_quantized(N: int, K: int, group_size: int, rng: np.random.Generator):
    """Random kernel-layout tensors with realistic magnitudes (for tests and benchmarks)."""
    q = rng.integers(0, 16, size=(N, K), dtype=np.uint8)
    z = rng.integers(0, 16, size=(N, K // group_size)).astype(np.float16)
    s = (rng.random((N, K // group_size), dtype=np.float32) * 0.02 + 0.001).astype(np.float16)
    return quantized_to_kernel_layout(q, s, z)
