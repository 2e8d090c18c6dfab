"""The opt-in weight-only INT8 lm_head (`awq-edge export --lm-head int8`, CPU and CUDA targets).

Default stays FP16 (the AutoAWQ convention: AWQ quantizes the decoder linears only). With `int8`, the
lm_head matrix is quantized once at export, symmetric int8 with an fp16 scale per row and per group of
`tvm_kernels.gemv_w8a16.DEFAULT_GROUP_SIZE` (32) along K, and the logits come from
tvm_kernels.gemv_w8a16 (activations stay FP16, float32 accumulation and logits).

Tied embeddings (SmolLM2): the INT8 table is the only copy; `embed` gathers the int8 rows and
dequantizes them (n x hidden multiplies per call, nothing per decode step that matters). Keeping an FP16
table beside it for the lookup would add 57 MB to the artifact and to resident memory for no decode
bandwidth (a lookup reads one row either way). This is also what llama.cpp does with its Q8_0
token_embd. An untied model keeps its FP16 embedding table and quantizes lm_head.weight.

Group size 32 over 64: llama.cpp's Q8_0 blocks are 32; the scales cost 2 bytes per 32 weights (+6%
over int8 alone); on SmolLM2's table the weight error was 0.02% RMS at g32 against 0.6% at g64 (that
shared reference was itself dequantized from a Q8_0 table, so g32 reproduces it almost exactly), and the
GEMV runs at the same speed for both (memory-bound). CPU and CUDA targets alike (tvm_kernels/gemv_w8a16
has a kernel for each); on CUDA the embedding rows are a plain gather that TVM's default GPU schedule takes.
"""
from __future__ import annotations

from export.errors import UserError

CHOICES = ("fp16", "int8")
_OPAQUE = 8  # relax OpPatternKind.kOpaque: the kernel arrives scheduled


def check_lm_head(lm_head: str, hidden_size: int) -> int | None:
    """The INT8 group size for `lm_head`, None for fp16. Checked before anything is built."""
    from tvm_kernels.gemv_w8a16 import DEFAULT_GROUP_SIZE

    if lm_head not in CHOICES:
        raise UserError(f"--lm-head {lm_head!r}: expected one of {', '.join(CHOICES)}")
    if lm_head == "fp16":
        return None
    if hidden_size % DEFAULT_GROUP_SIZE:
        raise UserError(f"--lm-head int8: hidden_size {hidden_size} is not a multiple of the INT8 group "
                        f"size {DEFAULT_GROUP_SIZE}")
    return DEFAULT_GROUP_SIZE


def quantize_table(w, group_size: int):
    """float [rows, cols] -> (int8 [rows, cols], float16 scales [rows, cols / G])."""
    from tvm_kernels.errors import UserError as KernelsError
    from tvm_kernels.gemv_w8a16 import quantize

    try:
        return quantize(w, group_size)
    except KernelsError as e:
        raise UserError(f"--lm-head int8: {e}") from None


def make_lm_head_op(device_target):
    """`logits(h2d f16 [M, K], weight int8 [N, K], scales f16 [N, K/G], G) -> f32 [M, N]` (one kernel
    per shape, symbolic M: decode's single row and prefill_logits' chunk alike) and
    `rows(ids int32 [n], weight, scales, G) -> f16 [n, K]` (the dequantized embedding rows)."""
    from tvm import te
    from tvm.relax.frontend.nn import Tensor, op

    from tvm_kernels.gemv_w8a16 import gemv_w8a16

    cache: dict = {}

    def logits(h, weight, scales, G: int):
        M, K = h.shape
        N = int(weight.shape[0])
        key = (N, int(K), G)
        if key not in cache:
            f = gemv_w8a16(N, int(K), G, device_target)
            cache[key] = f.without_attr("global_symbol").with_attr("op_pattern", _OPAQUE)
        return op.tensor_ir_op(cache[key], f"gemv_w8a16_n{N}_k{K}_g{G}", [h, weight, scales],
                               Tensor.placeholder([M, N], "float32"))

    def rows(ids, weight, scales, G: int):
        def f(i, w, s):
            return te.compute((i.shape[0], w.shape[1]), lambda t, k: (
                w[i[t], k].astype("float32") * s[i[t], k // G].astype("float32")).astype("float16"),
                name="take_int8")

        return op.tensor_expr_op(f, "take_int8", [ids, weight, scales])

    return logits, rows
