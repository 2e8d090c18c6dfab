"""The decoder-only transformer as a `relax.frontend.nn` module, over TVM's paged KV cache.

One module serves every supported family; a family differs only in the data of its `Family` entry
(bias on q/k/v, where its weights live). Linears are FP16 (`nn.Linear`) or W4A16 (`W4Linear`, the
kernels' layout: one copy of the weights for decode and prefill).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from export.errors import UserError


@dataclass(frozen=True)
class Family:
    name: str
    qkv_bias: bool = False  # Qwen2 adds a bias to q, k and v
    # where the decoder's tensors live in the checkpoint: the first prefix that holds embed_tokens
    weight_prefixes: tuple[str, ...] = ("model.",)
    lm_head: str = "lm_head.weight"
    text_config: str | None = None  # multimodal configs nest the language model's fields here


# architectures[0] of config.json -> family. Everything else about a model comes from its config.
FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family("llama"),  # Llama 2/3, SmolLM2, TinyLlama, ...
    "MistralForCausalLM": Family("mistral"),
    "Qwen2ForCausalLM": Family("qwen2", qkv_bias=True),
    # The language model of Qwen2.5-VL is Qwen2's; with text-only input its M-RoPE (three equal
    # position ids) is plain RoPE. transformers >= 4.52 nests it under model.language_model.
    "Qwen2_5_VLForConditionalGeneration": Family("qwen2_5_vl", qkv_bias=True,
                                                 weight_prefixes=("model.language_model.", "model."),
                                                 text_config="text_config"),
}


@dataclass
class ModelConfig:
    family: str
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    qkv_bias: bool
    context_length: int
    prefill_chunk_size: int
    rope_scaling: dict[str, Any] = field(default_factory=dict)  # TVM's form: {} or {"rope_type": "llama3", ...}
    group_size: int | None = None  # None: FP16 linears
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def as_manifest(self) -> dict[str, Any]:
        return asdict(self)


def family_of(hf: dict[str, Any], where: str) -> tuple[str, Family]:
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else ""
    if arch not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        raise UserError(f"{where}: architecture {arch or '(none)'!r} is not supported; supported: {known}")
    return arch, FAMILIES[arch]


def _rope(hf: dict[str, Any], where: str) -> tuple[float, dict[str, Any]]:
    # transformers 5 folds rope_theta and rope_scaling into rope_parameters; 4.x has them top level.
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in ("default", "mrope"):  # mrope: text-only positions make it plain RoPE
        return theta, {}
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if any(k not in params for k in keys):
            raise UserError(f"{where}: llama3 rope scaling needs {', '.join(keys)}")
        return theta, {"rope_type": "llama3", **{k: params[k] for k in keys}}
    raise UserError(f"{where}: rope scaling {kind!r} is not supported (default and llama3 are)")


def config_from_hf(hf: dict[str, Any], where: str, *, group_size: int | None, context_length: int | None = None,
                   prefill_chunk_size: int | None = None) -> ModelConfig:
    """Our config from a Hugging Face config.json dict. `where` names the file in errors."""
    arch, fam = family_of(hf, where)
    if fam.text_config and isinstance(hf.get(fam.text_config), dict):
        hf = {**hf, **{k: v for k, v in hf[fam.text_config].items() if v is not None}}
    if hf.get("mlp_bias"):
        raise UserError(f"{where}: mlp_bias is not supported")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UserError(f"{where}: hidden_act {act!r}; the module implements SwiGLU (silu)")
    try:
        hidden = int(hf["hidden_size"])
        heads = int(hf["num_attention_heads"])
        layers = int(hf["num_hidden_layers"])
        inter = int(hf["intermediate_size"])
        vocab = int(hf["vocab_size"])
    except KeyError as e:
        raise UserError(f"{where}: config lacks {e.args[0]}") from None
    head_dim = int(hf.get("head_dim") or hidden // heads)
    theta, scaling = _rope(hf, where)
    max_pos = int(hf.get("max_position_embeddings", 4096))
    ctx = int(context_length or min(max_pos, 4096))
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    if window and ctx > int(window):
        raise UserError(f"{where}: context length {ctx} exceeds the model's sliding window {window}; "
                        f"pass --context-length {window} or less (sliding-window attention is not exported)")
    if ctx > max_pos:
        raise UserError(f"--context-length {ctx} exceeds max_position_embeddings {max_pos} of {where}")
    chunk = int(prefill_chunk_size or min(ctx, 2048))
    if chunk < 1 or chunk > ctx:
        raise UserError(f"--prefill-chunk {chunk}: expected 1..{ctx} (the context length)")
    eos = hf.get("eos_token_id")
    eos = [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    return ModelConfig(
        family=fam.name, architecture=arch, hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=int(hf.get("num_key_value_heads") or heads), head_dim=head_dim,
        vocab_size=vocab, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta,
        rope_scaling=scaling, tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=fam.qkv_bias or bool(hf.get("attention_bias", False)), context_length=ctx,
        prefill_chunk_size=chunk, group_size=group_size, bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos,
    )


# ----------------------------------------------------------------------------------------------
# The nn.Module. tvm is imported lazily so that `awq-edge --help` stays fast.

def build_module(cfg: ModelConfig, linear_op: Callable | None, norm_ops: tuple[Callable, Callable]):
    """The nn.Module for `cfg`. `linear_op(x2d, weight, scales, zeros, N, K, G) -> y2d` runs a W4 linear
    (see export.kernels); unused for FP16 models. `norm_ops` = (rms_norm, add_rms_norm), the fused
    kernels of export.kernels.make_norm_ops."""
    from tvm import relax as rx
    from tvm import te
    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn import op
    from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache
    from tvm.target import Target

    from export.kernels import matmul_nt

    class W4Linear(nn.Module):
        """y = x @ W^T (+ b) with W in the kernels' W4A16 layout."""

        def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool):
            self.K, self.N, self.G = in_features, out_features, group_size
            self.weight = nn.Parameter((out_features, in_features // 8), "uint32")
            self.scales = nn.Parameter((out_features, in_features // group_size), "float16")
            self.zeros = nn.Parameter((out_features, in_features // group_size), "float16")
            self.bias = nn.Parameter((out_features,), "float16") if bias else None

        def forward(self, x):
            *lead, K = x.shape
            M = math.prod(lead) if all(isinstance(d, int) for d in lead) else _prod(lead)
            y = linear_op(op.reshape(x, (M, K)), self.weight, self.scales, self.zeros, self.N, self.K, self.G)
            if self.bias is not None:
                y = y + self.bias
            return op.reshape(y, (*lead, self.N))

    class Linear(nn.Module):
        """FP16 y = x @ W^T (+ b), accumulated in float32."""

        def __init__(self, in_features: int, out_features: int, bias: bool):
            self.weight = nn.Parameter((out_features, in_features), "float16")
            self.bias = nn.Parameter((out_features,), "float16") if bias else None

        def forward(self, x):
            y = matmul_nt(x, self.weight, "float16")
            return y if self.bias is None else y + self.bias

    def linear(k: int, n: int, bias: bool):
        if cfg.group_size is None:
            return Linear(k, n, bias)
        return W4Linear(k, n, cfg.group_size, bias)

    H, D = cfg.num_attention_heads, cfg.head_dim
    KV = cfg.num_key_value_heads

    class Attention(nn.Module):
        def __init__(self):
            self.qkv_proj = linear(cfg.hidden_size, (H + 2 * KV) * D, cfg.qkv_bias)
            self.o_proj = linear(H * D, cfg.hidden_size, False)

        def forward(self, x, kv, layer_id: int):
            b, s, _ = x.shape
            qkv = op.reshape(self.qkv_proj(x), (b, s, H + 2 * KV, D))
            out = kv.attention_with_fused_qkv(layer_id, qkv, H, sm_scale=D ** -0.5)
            return self.o_proj(op.reshape(out, (b, s, H * D)))

    class MLP(nn.Module):
        def __init__(self):
            self.gate_up_proj = linear(cfg.hidden_size, 2 * cfg.intermediate_size, False)
            self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size, False)

        def forward(self, x):
            gate, up = op.split(self.gate_up_proj(x), 2, axis=-1)
            return self.down_proj(op.silu(gate) * up)

    rms_norm_op, add_rms_norm_op = norm_ops

    class RMSNorm(nn.Module):
        """RMSNorm whose `add` form also takes the residual stream: one kernel returns the normalized sum
        and the sum itself (the residual for the next block)."""

        def __init__(self):
            self.weight = nn.Parameter((cfg.hidden_size,), "float16")

        def forward(self, x):
            b, s, d = x.shape
            return op.reshape(rms_norm_op(op.reshape(x, (b * s, d)), self.weight, cfg.rms_norm_eps), (b, s, d))

        def add(self, x, residual):
            b, s, d = x.shape
            y, total = add_rms_norm_op(op.reshape(x, (b * s, d)), op.reshape(residual, (b * s, d)), self.weight,
                                       cfg.rms_norm_eps)
            return op.reshape(y, (b, s, d)), op.reshape(total, (b, s, d))

    class Layer(nn.Module):
        def __init__(self):
            self.input_layernorm = RMSNorm()
            self.self_attn = Attention()
            self.post_attention_layernorm = RMSNorm()
            self.mlp = MLP()

        def forward(self, h, residual, kv, layer_id: int, next_norm: RMSNorm):
            """h = input_layernorm(residual) on entry; returns (next_norm(new residual), new residual)."""
            h, residual = self.post_attention_layernorm.add(self.self_attn(h, kv, layer_id), residual)
            return next_norm.add(self.mlp(h), residual)

    class Decoder(nn.Module):
        def __init__(self):
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype="float16")
            self.layers = nn.ModuleList([Layer() for _ in range(cfg.num_hidden_layers)])
            self.norm = RMSNorm()

        def forward(self, x, kv):
            layers = list(self.layers)
            h, residual = layers[0].input_layernorm(x), x
            for i, layer in enumerate(layers):
                nxt = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.norm
                h, residual = layer(h, residual, kv, i, nxt)
            return h

    class CausalLM(nn.Module):
        def __init__(self):
            self.model = Decoder()
            # lm_head stays FP16 (as AWQ keeps it); tied models reuse the embedding table.
            self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, False)

        def _logits(self, h):
            w = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
            # float32 accumulation: logits feed argmax/sampling and perplexity directly.
            return matmul_nt(h, w, "float32")

        def embed(self, input_ids):
            return self.model.embed_tokens(input_ids)

        def prefill(self, embeds, kv):
            h = self.model(embeds, kv)

            def last(x):
                b, s, d = x.shape
                return te.compute((b, 1, d), lambda i, _, k: x[i, s - 1, k], name="last_position")

            return self._logits(op.tensor_expr_op(last, "last_position", [h]))

        def prefill_logits(self, embeds, kv):
            return self._logits(self.model(embeds, kv))

        def decode(self, embeds, kv):
            return self._logits(self.model(embeds, kv))

        def create_kv_cache(self, max_batch_size, max_total_seq_len, prefill_chunk_size, page_size,
                            support_sliding_window):
            return TIRPagedKVCache(
                attn_kind="mha", max_batch_size=max_batch_size, max_total_seq_len=max_total_seq_len,
                prefill_chunk_size=prefill_chunk_size, page_size=page_size,
                support_sliding_window=support_sliding_window,
                layer_partition=rx.ShapeExpr([0, cfg.num_hidden_layers]),
                num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=H, num_key_value_heads=KV,
                qk_head_dim=D, v_head_dim=D, mla_original_qk_head_dim=0, mla_original_v_head_dim=0,
                # NORMAL: rotate-half RoPE applied to q and k before k enters the cache (as HF Llama).
                rope_mode=RopeMode.NORMAL, rope_scale=1, rope_theta=cfg.rope_theta,
                rope_scaling=dict(cfg.rope_scaling), rope_ext_factors=rx.prim_value(0), rotary_dim=D,
                enable_disaggregation=False, dtype="float16", target=Target.current(),
            )

    def spec():
        packed = {"param_mode": "packed", "effect_mode": "none"}
        kv = nn.spec.Object(object_type=PagedKVCache)
        hid = cfg.hidden_size
        return {
            "embed": {"input_ids": nn.spec.Tensor(["seq_len"], "int32"), "$": packed},
            "prefill": {"embeds": nn.spec.Tensor([1, "seq_len", hid], "float16"), "kv": kv, "$": packed},
            "prefill_logits": {"embeds": nn.spec.Tensor([1, "seq_len", hid], "float16"), "kv": kv, "$": packed},
            "decode": {"embeds": nn.spec.Tensor([1, 1, hid], "float16"), "kv": kv, "$": packed},
            "create_kv_cache": {
                "max_batch_size": int, "max_total_seq_len": int, "prefill_chunk_size": int, "page_size": int,
                "support_sliding_window": int, "$": {"param_mode": "none", "effect_mode": "none"},
            },
        }

    return CausalLM(), spec()


def _prod(dims):
    out = 1
    for d in dims:
        out = out * d
    return out


# name -> signature, for the manifest (the fixed VM contract the runtime drives)
FUNCTIONS = {
    "create_kv_cache": {
        "inputs": ["max_batch_size", "max_total_seq_len", "prefill_chunk_size", "page_size", "support_sliding_window"],
        "outputs": ["kv_cache"],
        "doc": "ShapeTuple ints; then vm.builtin.kv_state_add_sequence(kv, 0); reset with vm.builtin.kv_state_clear "
               "(or kv_state_popn to roll back n tokens); wrap each prefill/decode call in "
               "vm.builtin.kv_state_begin_forward / kv_state_end_forward",
    },
    "embed": {"inputs": ["input_ids int32[n]", "params"], "outputs": ["float16[n, hidden]"]},
    "prefill": {"inputs": ["embeds float16[1, n, hidden]", "kv_cache", "params"], "outputs": ["float32[1, 1, vocab]"],
                "doc": "n <= prefill_chunk_size; logits of the last position"},
    "prefill_logits": {"inputs": ["embeds float16[1, n, hidden]", "kv_cache", "params"],
                       "outputs": ["float32[1, n, vocab]"], "doc": "logits of every position (evaluation)"},
    "decode": {"inputs": ["embeds float16[1, 1, hidden]", "kv_cache", "params"], "outputs": ["float32[1, 1, vocab]"]},
}
