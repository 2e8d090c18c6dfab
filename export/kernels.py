"""How a W4A16 linear becomes TIR inside the Relax module.

Two providers with one signature `linear(x2d, weight, scales, zeros, N, K, G) -> y2d (float16 [M, N])`:
- `tvm_kernels`: the hand-scheduled kernels of tvm_kernels (decode GEMV when M == 1 is static,
  symbolic-M prefill GEMM otherwise). They arrive scheduled for the target, so they are marked
  opaque: fusing an elementwise op into them would hand dlight an unscheduled copy to re-schedule.
- `dequant`: dequantize in a TE op and let matmul follow; FuseOps puts the two in one function that
  dlight's GEMV/Matmul rules schedule (the stock TVM path, used to compare against ours).
"""
from __future__ import annotations

from contextlib import contextmanager

from export.errors import UserError

PROVIDERS = ("tvm_kernels", "dequant")
_OPAQUE = 8  # relax OpPatternKind.kOpaque


def make_linear_op(provider: str, target):
    if provider not in PROVIDERS:
        raise UserError(f"--kernels {provider!r}: expected one of {', '.join(PROVIDERS)}")
    return _tvm_kernels_linear(target) if provider == "tvm_kernels" else _dequant_linear


def make_norm_ops(device_target):
    """(rms_norm(x2d, w, eps) -> y2d, add_rms_norm(x2d, r2d, w, eps) -> (y2d, sum2d)): the fused kernels of
    tvm_kernels.fused_ops, marked opaque like the linears (they arrive scheduled)."""
    from tvm.relax.frontend.nn import Tensor, op

    from tvm_kernels.fused_ops import add_rms_norm

    cache: dict = {}

    def kernel(H: int, eps: float, residual: bool):
        key = (H, eps, residual)
        if key not in cache:
            f = add_rms_norm(H, eps, device_target, residual=residual)
            cache[key] = f.without_attr("global_symbol").with_attr("op_pattern", _OPAQUE)
        return cache[key]

    def rms_norm(x, w, eps: float):
        M, H = x.shape
        return op.tensor_ir_op(kernel(int(H), eps, False), f"rms_norm_h{H}", [x, w],
                               Tensor.placeholder([M, H], "float16"))

    def add_rms_norm_op(x, r, w, eps: float):
        M, H = x.shape
        return op.tensor_ir_op(kernel(int(H), eps, True), f"add_rms_norm_h{H}", [x, r, w],
                               [Tensor.placeholder([M, H], "float16"), Tensor.placeholder([M, H], "float16")])

    return rms_norm, add_rms_norm_op


def make_argmax_op(device_target):
    """argmax(logits f32 [1, 1, V]) -> int32 [1]: tvm_kernels.argmax, opaque like the other kernels."""
    from tvm.relax.frontend.nn import Tensor, op

    from tvm_kernels.argmax import argmax

    def argmax_op(logits):
        V = int(logits.shape[-1])
        f = argmax(V, device_target).without_attr("global_symbol").with_attr("op_pattern", _OPAQUE)
        return op.tensor_ir_op(f, f"argmax_v{V}", [logits], Tensor.placeholder([1], "int32"))

    return argmax_op


def make_sample_op(device_target):
    """sample(logits f32 [1, 1, V], cfg f32 [4], rng i32 [2], seen i32 [V]) -> int32 [1]: tvm_kernels.sample,
    which also advances rng[1] and marks the token in `seen`, in place; None where the target is not CUDA
    (the CPU runtime samples on the host)."""
    if not device_target.is_cuda:
        return None
    from tvm.relax.frontend.nn import Tensor, op

    from tvm_kernels.sample import sample

    def sample_op(logits, cfg, rng, seen):
        V = int(logits.shape[-1])
        f = sample(V, device_target).without_attr("global_symbol").with_attr("op_pattern", _OPAQUE)
        token, _, _ = op.tensor_ir_inplace_op(
            f, f"sample_v{V}", [logits, cfg, rng, seen], [-1, 2, 3],
            [Tensor.placeholder([1], "int32"), Tensor.placeholder([2], "int32"), Tensor.placeholder([V], "int32")])
        return token

    return sample_op


@contextmanager
def attention_kernels(device_target, rope_mode: int):
    """While TVM's paged KV cache is being built, hand it our CUDA attention kernels for fp16 layers:
    tvm_kernels.decode_attention (split-KV decode, full-attention and sliding-window layers) and
    tvm_kernels.prefill_attention (tensor-core prefill over the new tokens, and over the cached pages before
    them; not for sliding-window layers).

    The cache has no parameter for this: TIRPagedKVCache looks its kernel builders up by name in
    tvm.relax.frontend.nn.llm.kv_cache when constructed, so the names are swapped for the duration of
    that call and restored after. Other dtypes, inline RoPE and the CPU keep TVM's own kernels (the CPU's are
    replaced afterwards, export.cpu_schedule.attention_pass)."""
    import tvm.relax.frontend.nn.llm.kv_cache as kvc

    from tvm_kernels.decode_attention import applies_to, decode_attention
    from tvm_kernels.prefill_attention import prefill_attention, supports

    if not device_target.is_cuda or not applies_to(rope_mode):
        yield
        return
    stock_decode, stock_prefill, stock_paged = kvc._attention_decode, kvc._attention_prefill_ragged, kvc._attention_prefill

    def decode(num_kv_heads, num_qo_heads, head_dim, dtype, sliding_window, rope_scaling, target, page_size=16):
        if dtype != "float16":
            return stock_decode(num_kv_heads, num_qo_heads, head_dim, dtype, sliding_window, rope_scaling, target, page_size)
        return decode_attention(num_kv_heads, num_qo_heads, head_dim, device_target, page_size=page_size, dtype=dtype,
                                sliding_window=bool(sliding_window))

    def prefill(h_kv, h_q, d_qk, d_v, dtype, rope_scaling, target):
        # same semantics as TVM's ragged kernel (causal attention among the new tokens; the cache adds the
        # cached prefix, windowed or not, with its paged kernels); MLA (d_qk != d_v) and head_dim > 128
        # (Gemma3's 256) keep TVM's
        if d_qk != d_v or dtype != "float16" or not supports(h_q, h_kv, d_qk):
            return stock_prefill(h_kv, h_q, d_qk, d_v, dtype, rope_scaling, target)
        return prefill_attention(h_kv, h_q, d_qk, device_target, dtype=dtype)

    def paged(h_kv, h_q, d, dtype, sliding_window, rope_scaling, target, page_size=16, sliding_window_size=1024):
        # the chunk against the tokens cached before it (a follow-up turn, a long prompt's next chunk): TVM's
        # kernel there ran a 200-token turn after 1500 cached tokens in 36 ms for SmolLM2 (2.5 ms with no history;
        # ours 6.2 ms, benchmarks/results/e2e_gpu_turn_h100.json)
        if sliding_window or dtype != "float16" or not supports(h_q, h_kv, d):
            return stock_paged(h_kv, h_q, d, dtype, sliding_window, rope_scaling, target, page_size, sliding_window_size)
        return prefill_attention(h_kv, h_q, d, device_target, dtype=dtype, page_size=page_size)

    kvc._attention_decode, kvc._attention_prefill_ragged, kvc._attention_prefill = decode, prefill, paged
    try:
        yield
    finally:
        kvc._attention_decode, kvc._attention_prefill_ragged, kvc._attention_prefill = stock_decode, stock_prefill, stock_paged


def matmul_nt(x, weight, out_dtype: str = "float32"):
    """y[..., n] = sum_k x[..., k] * weight[n, k] accumulated in float32, as one TE op: no transposed
    copy of the weight (relax's matmul(x, permute_dims(w)) materializes one per call unless a
    separate pass fuses it)."""
    from tvm import te
    from tvm.relax.frontend.nn import op

    def f(a, w):
        K = a.shape[-1]
        k = te.reduce_axis((0, K), name="k")
        return te.compute(
            (*a.shape[:-1], w.shape[0]),
            lambda *i: te.sum(a[(*i[:-1], k)].astype("float32") * w[i[-1], k].astype("float32"), axis=k),
            name="matmul")

    y = op.tensor_expr_op(f, "matmul_nt", [x, weight])
    return y if out_dtype == "float32" else y.astype(out_dtype)


def _dequant_linear(x, weight, scales, zeros, N: int, K: int, G: int):
    from tvm import te, tirx
    from tvm.relax.frontend.nn import op

    def f(a, w, s, z):
        k = te.reduce_axis((0, K), name="k")

        def deq(n, kk):
            q = (w[n, kk // 8] >> tirx.Cast("uint32", (kk % 8) * 4)) & tirx.const(0xF, "uint32")
            return (q.astype("float16") - z[n, kk // G]) * s[n, kk // G]

        return te.compute(
            (a.shape[0], N),
            lambda m, n: te.sum(a[m, k].astype("float32") * deq(n, k).astype("float32"), axis=k),
            name="dequant_matmul")

    return op.tensor_expr_op(f, "dequant_matmul", [x, weight, scales, zeros]).astype("float16")


def _tvm_kernels_linear(target):
    from tvm.relax.frontend.nn import Tensor, op

    from tvm_kernels.pdl import SKIP_ATTR
    from tvm_kernels.targets import get_target

    try:
        from tvm_kernels.gemm_w4a16 import gemm_w4a16
        from tvm_kernels.gemv_w4a16 import gemv_w4a16, l2_prefetch_plan
    except ImportError as e:
        raise UserError(f"--kernels tvm_kernels: the kernels are not available ({e}); use --kernels dequant") from None
    cache: dict = {}

    def kernel(N: int, K: int, G: int, decode: bool, glu: str | None = None, norm_eps: float | None = None,
               residual: bool = False, prefetch=None):
        key = (N, K, G, decode, glu, norm_eps, residual, prefetch)
        if key not in cache:
            # the prefill GEMM launches without PDL: its blocks (large shared memory) parked early on the
            # SMs cost the 7B 2.3 ms of time to first token (tvm_kernels/pdl.py)
            f = (gemv_w4a16(N, K, G, target, M=1, glu=glu, norm_eps=norm_eps, residual=residual, prefetch=prefetch)
                 if decode else gemm_w4a16(N, K, G, target).with_attr(SKIP_ATTR, True))
            # The builders name their PrimFunc "main"; the module gives each its own symbol.
            cache[key] = f.without_attr("global_symbol").with_attr("op_pattern", _OPAQUE)
        return cache[key]

    def _prefetch(nxt):
        """(extra args, L2Prefetch, name suffix) for `nxt` = (weight, scales, zeros, L2Prefetch) or None."""
        if nxt is None:
            return [], None, ""
        pw, ps, pz, plan = nxt
        return [pw, ps, pz], plan, f"_pf{plan.rows}"

    def linear(x, weight, scales, zeros, N: int, K: int, G: int, prefetch=None):
        M = x.shape[0]
        decode = isinstance(M, int) and M == 1
        extra, plan, suffix = _prefetch(prefetch if decode else None)
        name = f"{'gemv' if decode else 'gemm'}_w4a16_n{N}_k{K}_g{G}{suffix}"
        return op.tensor_ir_op(kernel(N, K, G, decode, prefetch=plan), name, [x, weight, scales, zeros, *extra],
                               Tensor.placeholder([M, N], "float16"))

    def decode(x, weight, scales, zeros, N: int, K: int, G: int, *, glu: str | None = None, norm=None, residual=None,
               prefetch=None):
        """The decode GEMV with its neighbours inside, or None where there is no such kernel (prefill, other
        activations): the model then runs them as ops of their own.
        `glu`: act(gate) * up, rows interleaved gate and up (export/exporter.py); `norm` = (gamma, eps): x is
        the residual stream, normalized in the kernel; `residual`: a tensor [1, N] added to the output;
        `prefetch`: (weight, scales, zeros, L2Prefetch) of the next GEMV (`linear.l2_prefetch`)."""
        from tvm_kernels.gemv_w4a16 import GLU_ACTIVATIONS

        M = x.shape[0]
        if not (isinstance(M, int) and M == 1) or (glu is not None and glu not in GLU_ACTIVATIONS):
            return None
        gamma, eps = norm if norm is not None else (None, None)
        extra, plan, suffix = _prefetch(prefetch)
        args = [x, weight, scales, zeros] + ([gamma] if norm is not None else []) + (
            [residual] if residual is not None else []) + extra
        name = "gemv_w4a16" + "".join(f"_{p}" for p, on in (("norm", norm is not None), (glu, glu is not None),
                                                            ("add", residual is not None)) if on)
        return op.tensor_ir_op(kernel(N, K, G, True, glu, eps, residual is not None, plan),
                               f"{name}_n{N}_k{K}_g{G}{suffix}", args,
                               Tensor.placeholder([M, N // 2 if glu else N], "float16"))

    def l2_prefetch(N: int, K: int, G: int, after_attention: bool):
        """What a decode GEMV prefetches of the next one (N x K, group G), or None (tvm_kernels.gemv_w4a16's
        l2_prefetch_plan for this target)."""
        return l2_prefetch_plan(N, K, G, target, after_attention=after_attention)

    if get_target(target).is_cuda:  # the CPU GEMV has none of these epilogues and prologues
        linear.decode = decode
        linear.l2_prefetch = l2_prefetch
    return linear
