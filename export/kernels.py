"""How a W4A16 linear becomes TIR inside the Relax module.

Two providers with one signature `linear(x2d, weight, scales, zeros, N, K, G) -> y2d (float16 [M, N])`:
- `tvm_kernels`: the hand-scheduled kernels of tvm_kernels (decode GEMV when M == 1 is static,
  symbolic-M prefill GEMM otherwise). They arrive scheduled for the target, so they are marked
  opaque: fusing an elementwise op into them would hand dlight an unscheduled copy to re-schedule.
- `dequant`: dequantize in a TE op and let matmul follow; FuseOps puts the two in one function that
  dlight's GEMV/Matmul rules schedule (the stock TVM path, used to compare against ours).
"""
from __future__ import annotations

from export.errors import UserError

PROVIDERS = ("tvm_kernels", "dequant")
_OPAQUE = 8  # relax OpPatternKind.kOpaque


def make_linear_op(provider: str, target):
    if provider not in PROVIDERS:
        raise UserError(f"--kernels {provider!r}: expected one of {', '.join(PROVIDERS)}")
    return _tvm_kernels_linear(target) if provider == "tvm_kernels" else _dequant_linear


def _dequant_linear(x, weight, scales, zeros, N: int, K: int, G: int):
    from tvm import te, tirx
    from tvm.relax.frontend.nn import op

    def dequantize(w, s, z):
        def f(n, k):
            q = (w[n, k // 8] >> tirx.Cast("uint32", (k % 8) * 4)) & tirx.const(0xF, "uint32")
            return (q.astype("float16") - z[n, k // G]) * s[n, k // G]

        return te.compute((N, K), f, name="dequantize")

    w = op.tensor_expr_op(dequantize, "dequantize", [weight, scales, zeros])
    return op.matmul(x, op.permute_dims(w), out_dtype="float32").astype("float16")


def _tvm_kernels_linear(target):
    from tvm.relax.frontend.nn import Tensor, op

    try:
        from tvm_kernels.gemm_w4a16 import gemm_w4a16
        from tvm_kernels.gemv_w4a16 import gemv_w4a16
    except ImportError as e:
        raise UserError(f"--kernels tvm_kernels: the kernels are not available ({e}); use --kernels dequant") from None
    cache: dict = {}

    def kernel(N: int, K: int, G: int, decode: bool):
        key = (N, K, G, decode)
        if key not in cache:
            f = gemv_w4a16(N, K, G, target, M=1) if decode else gemm_w4a16(N, K, G, target)
            cache[key] = f.with_attr("op_pattern", _OPAQUE)
        return cache[key]

    def linear(x, weight, scales, zeros, N: int, K: int, G: int):
        M = x.shape[0]
        decode = isinstance(M, int) and M == 1
        name = f"{'gemv' if decode else 'gemm'}_w4a16_n{N}_k{K}_g{G}"
        return op.tensor_ir_op(kernel(N, K, G, decode), name, [x, weight, scales, zeros],
                               Tensor.placeholder([M, N], "float16"))

    return linear
