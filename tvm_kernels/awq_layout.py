"""The AutoAWQ GEMM checkpoint layout (what vLLM, HF transformers and LMDeploy load). Pure numpy.

Per linear with in_features K, out_features N, group G:
  qweight int32 [K, N/8], qzeros int32 [K/G, N/8], scales fp16 [K/G, N];
  nibble i of each int32 (from the least significant) holds output column AWQ_ORDER[i] of its
  group of 8 columns; W^T[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n].
"""
from __future__ import annotations

import numpy as np

from tvm_kernels.errors import UserError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# AWQ_REVERSE_ORDER[c] is the nibble that holds column c of a group of 8.
AWQ_REVERSE_ORDER = tuple(AWQ_ORDER.index(c) for c in range(8))


def pack_awq(values: np.ndarray, bits: int = 4) -> np.ndarray:
    """[rows, N] unsigned ints < 2**bits -> int32 [rows, N/8] in AutoAWQ nibble order.

    AutoAWQ stores INT3 weights in the same 4-bit container, so `bits` only bounds the values.
    """
    values = np.asarray(values)
    if values.ndim != 2 or values.shape[1] % 8:
        raise UserError(f"pack_awq: expected [rows, N] with N a multiple of 8, got {values.shape}")
    if values.size and (values.min() < 0 or values.max() >= (1 << bits)):
        raise UserError(f"pack_awq: values must lie in [0, {(1 << bits) - 1}]")
    v = values.astype(np.uint32).reshape(values.shape[0], -1, 8)[:, :, list(AWQ_ORDER)]
    shifts = (np.arange(8, dtype=np.uint32) * 4)[None, None, :]
    # Contiguous so that writers that take the raw buffer (safetensors.numpy) see the logical order.
    return np.ascontiguousarray(np.bitwise_or.reduce(v << shifts, axis=2)).view(np.int32)


def unpack_awq(packed: np.ndarray) -> np.ndarray:
    """int32 [rows, N/8] in AutoAWQ nibble order -> uint8 [rows, N]."""
    packed = np.ascontiguousarray(packed).view(np.uint32)
    shifts = (np.arange(8, dtype=np.uint32) * 4)[None, None, :]
    nibbles = ((packed[:, :, None] >> shifts) & 0xF).astype(np.uint8)  # [rows, N/8, nibble]
    return nibbles[:, :, list(AWQ_REVERSE_ORDER)].reshape(packed.shape[0], -1)


def dequantize_awq(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    """AutoAWQ tensors -> float32 W^T [K, N] (the linear computes y = x @ W^T)."""
    q = unpack_awq(qweight).astype(np.float32)
    z = unpack_awq(qzeros).astype(np.float32)
    s = np.asarray(scales, dtype=np.float32)
    K, N = q.shape
    if K % group_size or z.shape != (K // group_size, N) or s.shape != (K // group_size, N):
        raise UserError(
            f"AWQ tensors disagree: qweight {qweight.shape}, qzeros {qzeros.shape}, scales {scales.shape}, group {group_size}"
        )
    return (q - np.repeat(z, group_size, axis=0)) * np.repeat(s, group_size, axis=0)
