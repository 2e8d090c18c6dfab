"""The decoder-only transformer as a `relax.frontend.nn` module, over TVM's paged KV cache.

One module serves every supported family; a family differs only in the data of its `Family` entry
(biases, norm kind, q/k norms, sandwich norms, embedding scale, activation, gated MLP, learned or
rotary positions, per-layer sliding windows, where its weights live), which picks among small module
variants. Linears are FP16 (`Linear`) or W4A16 (`W4Linear`, the kernels' layout: one copy of the
weights for decode and prefill).

Positions for a learned table (OPT) or for RoPE applied in the module (Gemma3: a base per layer kind)
come from the paged KV cache (`get_query_positions`), so the VM functions keep their signatures.
Gemma3's local layers use the cache's per-layer sliding window (attn_kind "mha_sliding"): they attend
over the last `sliding_window` tokens (the current one included, as HF) at any context length.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from export.errors import UserError


@dataclass(frozen=True)
class Family:
    """What distinguishes a family, as data. The module tree and parameter names are Llama's; a
    family whose checkpoint names differ says how through `renames` (our name component -> theirs)."""

    name: str
    qkv_bias: bool = False  # Qwen2 adds a bias to q, k and v
    linear_bias: bool = False  # OPT: every linear (q/k/v, o, the MLP) has a bias
    # where the decoder's tensors live in the checkpoint: the first prefix that holds embed_tokens
    weight_prefixes: tuple[str, ...] = ("model.",)
    lm_head: str = "lm_head.weight"
    text_config: str | None = None  # multimodal configs nest the language model's fields here
    renames: tuple[tuple[str, str], ...] = ()  # to "": the component is dropped
    # config.json keys that differ from Llama's: (Llama's key, this family's key)
    config_keys: tuple[tuple[str, str], ...] = ()
    # config values the module below assumes: (key, value); a config that lacks the key has HF's default
    requires: tuple[tuple[str, Any], ...] = ()
    # config keys whose values must be equal: (key, other key, what is not exported otherwise)
    requires_equal: tuple[tuple[str, str, str], ...] = ()
    norm: str = "rms"  # "rms" | "rms_one_plus" (Gemma: x_hat * (1 + w) in float32) | "layernorm" (with bias)
    norm_eps_default: float = 1e-6
    qk_norm: bool = False  # Gemma3: RMSNorm of each q and k head before RoPE
    sandwich_norms: bool = False  # Gemma3: attention/MLP outputs are normed too before the residual add
    embed_scale: bool = False  # Gemma: embeddings * sqrt(hidden), the factor rounded to the embedding dtype
    gated_mlp: bool = True  # act(gate) * up -> down; False: act(up) -> down (OPT's fc1 -> relu -> fc2)
    positions: str = "rope"  # "rope" | "learned" (OPT: a table indexed by position + position_offset)
    position_offset: int = 0
    # RoPE inside the module (per-layer bases: Gemma3's local and global layers) instead of the KV cache's
    rope_in_model: bool = False
    layer_sliding_window: bool = False  # per-layer sliding-window attention (config layer_types)


# architectures[0] of config.json -> family. Everything else about a model comes from its config.
_GEMMA3 = dict(norm="rms_one_plus", qk_norm=True, sandwich_norms=True, embed_scale=True, rope_in_model=True,
               layer_sliding_window=True, config_keys=(("hidden_act", "hidden_activation"),),
               requires=(("final_logit_softcapping", None), ("attn_logit_softcapping", None),
                         ("use_bidirectional_attention", False)))
FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family("llama"),  # Llama 2/3, SmolLM2, TinyLlama, ...
    "MistralForCausalLM": Family("mistral"),
    "Qwen2ForCausalLM": Family("qwen2", qkv_bias=True),
    # The language model of Qwen2.5-VL is Qwen2's; with text-only input its M-RoPE (three equal
    # position ids) is plain RoPE. transformers >= 4.52 nests it under model.language_model.
    "Qwen2_5_VLForConditionalGeneration": Family("qwen2_5_vl", qkv_bias=True,
                                                 weight_prefixes=("model.language_model.", "model."),
                                                 text_config="text_config"),
    "Gemma3ForCausalLM": Family("gemma3_text", **_GEMMA3),
    # The vision tower and projector are not exported: text-only input never reaches them.
    "Gemma3ForConditionalGeneration": Family("gemma3", weight_prefixes=("model.language_model.", "language_model.model."),
                                             text_config="text_config", **_GEMMA3),
    # Pre-LN OPT (125m, 1.3b and up; 350m is post-LN) without the embedding projections.
    "OPTForCausalLM": Family(
        "opt", linear_bias=True, qkv_bias=True, weight_prefixes=("model.decoder.", "decoder."), norm="layernorm",
        norm_eps_default=1e-5, gated_mlp=False, positions="learned", position_offset=2,
        renames=(("input_layernorm", "self_attn_layer_norm"), ("post_attention_layernorm", "final_layer_norm"),
                 ("o_proj", "out_proj"), ("mlp", ""), ("up_proj", "fc1"), ("down_proj", "fc2"), ("norm", "final_layer_norm")),
        config_keys=(("intermediate_size", "ffn_dim"), ("hidden_act", "activation_function")),
        requires_equal=(("word_embed_proj_dim", "hidden_size", "OPT's embedding projections (project_in/out)"),),
        requires=(("do_layer_norm_before", True), ("_remove_final_layer_norm", False), ("enable_bias", True),
                  ("layer_norm_elementwise_affine", True))),
}

# config hidden_act -> the module's activation
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


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
    rms_norm_eps: float  # the eps of every norm (LayerNorm's for OPT)
    rope_theta: float
    tie_word_embeddings: bool
    qkv_bias: bool
    context_length: int
    prefill_chunk_size: int
    rope_scaling: dict[str, Any] = field(default_factory=dict)  # TVM's form: {} or {"rope_type": "llama3", ...}
    group_size: int | None = None  # None: FP16 linears
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    activation: str = "silu"  # silu | gelu_tanh | gelu | relu
    attention_scale: float | None = None  # None: head_dim ** -0.5 (Gemma3: query_pre_attn_scalar ** -0.5)
    # per layer "full_attention" | "sliding_attention"; empty: all full
    layer_types: list[str] = field(default_factory=list)
    sliding_window: int = 0  # window (tokens, the current one included) of the sliding layers
    rope_local_theta: float | None = None  # RoPE base of the sliding layers (Gemma3's rope_local_base_freq)
    rope_local_scaling: dict[str, Any] = field(default_factory=dict)
    max_position_embeddings: int = 0  # rows of a learned position table (less its offset)
    lm_head: str = "fp16"  # "fp16" | "int8" (weight-only, export/lm_head.py; tied: the embedding table too)
    lm_head_group_size: int | None = None  # int8: one fp16 scale per row and per this many columns

    def as_manifest(self) -> dict[str, Any]:
        return asdict(self)

    def layer_rope(self, i: int) -> tuple[float, dict[str, Any]]:
        if self.layer_types and self.layer_types[i] == "sliding_attention" and self.rope_local_theta is not None:
            return self.rope_local_theta, self.rope_local_scaling
        return self.rope_theta, self.rope_scaling

    def sliding_layers(self) -> list[bool]:
        """Which layers attend over a window narrower than the context (the others see it all)."""
        narrow = 0 < self.sliding_window < self.context_length
        return [narrow and t == "sliding_attention" for t in (self.layer_types or ["full_attention"] * self.num_hidden_layers)]


def family_of(hf: dict[str, Any], where: str) -> tuple[str, Family]:
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else ""
    if arch not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        raise UserError(f"{where}: architecture {arch or '(none)'!r} is not supported; supported: {known}")
    return arch, FAMILIES[arch]


def _rope(params: dict[str, Any], default_theta: float, where: str, *, in_model: bool) -> tuple[float, dict[str, Any]]:
    theta = float(params.get("rope_theta", default_theta))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in ("default", "mrope"):  # mrope: text-only positions make it plain RoPE
        return theta, {}
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if any(k not in params for k in keys):
            raise UserError(f"{where}: llama3 rope scaling needs {', '.join(keys)}")
        return theta, {"rope_type": "llama3", **{k: params[k] for k in keys}}
    if kind == "linear" and in_model:  # positions / factor (Gemma3's global layers)
        return theta, {"rope_type": "linear", "factor": float(params["factor"])}
    known = "default, llama3" + (", linear" if in_model else "")
    raise UserError(f"{where}: rope scaling {kind!r} is not supported ({known} are)")


def _ropes(hf: dict[str, Any], fam: Family, where: str) -> tuple[tuple[float, dict], tuple[float, dict] | None]:
    """(global RoPE, local RoPE or None). transformers 5 folds rope_theta and rope_scaling into
    rope_parameters (per layer type for Gemma3); 4.x has them top level (Gemma3: rope_local_base_freq)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(hf.get("rope_theta", 10000.0))
    if "full_attention" in params or "sliding_attention" in params:
        full = _rope(dict(params.get("full_attention") or {}), theta, where, in_model=fam.rope_in_model)
        local = params.get("sliding_attention")
        return full, _rope(dict(local), theta, where, in_model=fam.rope_in_model) if local else None
    full = _rope(params, theta, where, in_model=fam.rope_in_model)
    local = hf.get("rope_local_base_freq")
    return full, ((float(local), {}) if local is not None else None)


def _layer_types(hf: dict[str, Any], layers: int, where: str) -> list[str]:
    types = hf.get("layer_types")
    if types is None and hf.get("sliding_window_pattern"):  # transformers 4.x Gemma3
        pattern = int(hf["sliding_window_pattern"])
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]
    types = list(types or [])
    if types and (len(types) != layers or set(types) - {"full_attention", "sliding_attention"}):
        raise UserError(f"{where}: layer_types must list full_attention / sliding_attention for each of {layers} layers")
    return types


def config_from_hf(hf: dict[str, Any], where: str, *, group_size: int | None, context_length: int | None = None,
                   prefill_chunk_size: int | None = None) -> ModelConfig:
    """Our config from a Hugging Face config.json dict. `where` names the file in errors."""
    arch, fam = family_of(hf, where)
    if fam.text_config and isinstance(hf.get(fam.text_config), dict):
        hf = {**hf, **{k: v for k, v in hf[fam.text_config].items() if v is not None}}
    hf = {**hf, **{ours: hf[theirs] for ours, theirs in fam.config_keys if theirs in hf}}
    for key, want in fam.requires:
        if key in hf and hf[key] != want:
            raise UserError(f"{where}: {key}={hf[key]!r} is not supported for {arch} (the export needs {want!r})")
    for key, other, what in fam.requires_equal:
        if key in hf and hf[key] != hf.get(other):
            raise UserError(f"{where}: {key} {hf[key]} differs from {other} {hf.get(other)}; {what} are not exported")
    if hf.get("mlp_bias"):
        raise UserError(f"{where}: mlp_bias is not supported")
    act = hf.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise UserError(f"{where}: hidden_act {act!r} is not supported ({', '.join(ACTIVATIONS)} are)")
    try:
        hidden = int(hf["hidden_size"])
        heads = int(hf["num_attention_heads"])
        layers = int(hf["num_hidden_layers"])
        inter = int(hf["intermediate_size"])
        vocab = int(hf["vocab_size"])
    except KeyError as e:
        raise UserError(f"{where}: config lacks {e.args[0]}") from None
    head_dim = int(hf.get("head_dim") or hidden // heads)
    (theta, scaling), local = _ropes(hf, fam, where)
    max_pos = int(hf.get("max_position_embeddings", 4096))
    ctx = int(context_length or min(max_pos, 4096))
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    types = _layer_types(hf, layers, where) if fam.layer_sliding_window else []
    if window and ctx > int(window) and not fam.layer_sliding_window:
        raise UserError(f"{where}: context length {ctx} exceeds the model's sliding window {window}; "
                        f"pass --context-length {window} or less (sliding-window attention is not exported)")
    if fam.layer_sliding_window and "sliding_attention" in types and not window:
        raise UserError(f"{where}: layer_types has sliding_attention layers but no sliding_window")
    if ctx > max_pos:
        raise UserError(f"--context-length {ctx} exceeds max_position_embeddings {max_pos} of {where}")
    # The paged KV cache attends the tokens of one prefill chunk to each other with plain causal
    # attention, windowed or not (TVM's ragged kernel has no window), so a chunk must fit in the window;
    # and the last query of a window-sized chunk would see no cached token at all, which TVM's paged
    # sliding-window kernel turns into NaN (tiny Gemma3, window 16, tried by hand: a 40-token chunk misses
    # transformers far beyond the test tolerance, a 16-token one gives NaN; tests/test_export_families.py
    # checks that 15, the default, matches).
    limit = int(window) - 1 if types and "sliding_attention" in types and int(window) < ctx else ctx
    chunk = int(prefill_chunk_size or min(limit, 2048))
    if chunk < 1 or chunk > limit:
        what = "the context length" if limit == ctx else f"the sliding window of {where}"
        raise UserError(f"--prefill-chunk {chunk}: expected 1..{limit} ({what})")
    eos = hf.get("eos_token_id")
    eos = [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    scalar = hf.get("query_pre_attn_scalar")
    return ModelConfig(
        family=fam.name, architecture=arch, hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=int(hf.get("num_key_value_heads") or heads), head_dim=head_dim,
        vocab_size=vocab, rms_norm_eps=float(hf.get("rms_norm_eps", hf.get("layer_norm_eps", fam.norm_eps_default))),
        rope_theta=theta, rope_scaling=scaling, tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=fam.qkv_bias or bool(hf.get("attention_bias", False)), context_length=ctx,
        prefill_chunk_size=chunk, group_size=group_size, bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos,
        activation=ACTIVATIONS[act], attention_scale=float(scalar) ** -0.5 if scalar else None,
        layer_types=types, sliding_window=int(window or 0) if types else 0,
        rope_local_theta=local[0] if local else None, rope_local_scaling=local[1] if local else {},
        max_position_embeddings=max_pos if fam.positions == "learned" else 0,
    )


# ----------------------------------------------------------------------------------------------
# The nn.Module. tvm is imported lazily so that `awq-edge --help` stays fast.

# Decode folds each add + RMSNorm into the GEMVs around it (Layer.stream) up to this hidden size. Every block
# of the norm-prologue GEMV reads all of x and gamma and normalizes before its first multiply; measured side by
# side on the H100 (benchmarks/results/norm_fusion_ab_h100.json): SmolLM2 (576) decode x1.05-1.06 over 10
# rounds, one launch fewer per norm; the 7B (4096, 1536-2752 blocks) x0.98, and x0.95-0.99 with blocks looping over
# several row tiles to normalize once, so it keeps the norm kernels.
FUSED_NORMS_MAX_HIDDEN = 2048


def build_module(cfg: ModelConfig, linear_op: Callable | None, norm_ops: tuple[Callable, Callable],
                 attention_kernels: Callable | None = None, lm_head_ops: tuple[Callable, Callable] | None = None,
                 argmax_op: Callable | None = None, sample_op: Callable | None = None):
    """The nn.Module for `cfg`. `linear_op(x2d, weight, scales, zeros, N, K, G) -> y2d` runs a W4 linear
    (see export.kernels); unused for FP16 models. `norm_ops` = (rms_norm, add_rms_norm), the fused
    kernels of export.kernels.make_norm_ops. `attention_kernels(rope_mode)`: a context manager around the
    KV cache's construction that installs our attention kernels (export.kernels.attention_kernels).
    `lm_head_ops` = (logits, rows) of export.lm_head.make_lm_head_op, for cfg.lm_head "int8".
    `argmax_op(logits) -> int32 [1]` (export.kernels.make_argmax_op) adds the `argmax` function,
    `sample_op(logits, cfg, rng, seen) -> int32 [1]` (export.kernels.make_sample_op) the `sample` function."""
    import contextlib

    import numpy as np
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
            # the next decode GEMV of a step (link_decode_chain); a function, so that nn.Module does not
            # count the other linear's parameters as this one's
            self._prefetch = lambda: None

        def prefetch_next(self, nxt: "W4Linear", after_attention: bool):
            plan_of = getattr(linear_op, "l2_prefetch", None)
            plan = plan_of(nxt.N, nxt.K, nxt.G, after_attention) if plan_of else None
            if plan is not None:
                self._prefetch = lambda: (nxt.weight, nxt.scales, nxt.zeros, plan)

        @staticmethod
        def _rows(x):
            """x [..., K] -> (the leading dims, x as [M, K]): the kernels take 2-D activations."""
            *lead, K = x.shape
            M = math.prod(lead) if all(isinstance(d, int) for d in lead) else _prod(lead)
            return lead, op.reshape(x, (M, K))

        def forward(self, x):
            lead, x2 = self._rows(x)
            pf = self._prefetch()  # only a provider with l2_prefetch (prefetch_next) takes the argument
            y = linear_op(x2, self.weight, self.scales, self.zeros, self.N, self.K, self.G,
                          **({} if pf is None else {"prefetch": pf}))
            if self.bias is not None:
                y = y + self.bias
            return op.reshape(y, (*lead, self.N))

        def decode(self, x, *, glu: str | None = None, norm=None, residual=None):
            """The provider's decode GEMV with its neighbours inside (export.kernels: `glu` act(gate) * up over
            rows interleaved gate_j, up_j; `norm` = (gamma, eps) on x; `residual` added to y), or None where it
            has no such kernel for this call."""
            fused = getattr(linear_op, "decode", None)
            if fused is None or (self.bias is not None and (glu is not None or residual is not None)):
                return None  # a bias belongs before the activation and the residual add
            lead, x2 = self._rows(x)
            r2 = None if residual is None else self._rows(residual)[1]
            h = fused(x2, self.weight, self.scales, self.zeros, self.N, self.K, self.G, glu=glu, norm=norm, residual=r2,
                      prefetch=self._prefetch())
            if h is None:
                return None
            if self.bias is not None:
                h = h + self.bias
            return op.reshape(h, (*lead, self.N // 2 if glu else self.N))

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

    class Int8Table(nn.Module):
        """INT8 [vocab, hidden] with fp16 scales per row and group: the lm_head (and a tied embedding)."""

        def __init__(self):
            self.G = cfg.lm_head_group_size
            self.weight = nn.Parameter((cfg.vocab_size, cfg.hidden_size), "int8")
            self.scales = nn.Parameter((cfg.vocab_size, cfg.hidden_size // self.G), "float16")

        def forward(self, input_ids):  # the embedding lookup: only the gathered rows are dequantized
            return lm_head_ops[1](input_ids, self.weight, self.scales, self.G)

        def logits(self, h):
            *lead, K = h.shape
            y = lm_head_ops[0](op.reshape(h, (_prod(lead), K)), self.weight, self.scales, self.G)
            return op.reshape(y, (*lead, cfg.vocab_size))

    int8_head = cfg.lm_head == "int8"
    if int8_head and lm_head_ops is None:
        raise UserError("--lm-head int8: the module needs the INT8 lm_head kernels (lm_head_ops)")

    fam = FAMILIES[cfg.architecture]
    H, D = cfg.num_attention_heads, cfg.head_dim
    KV = cfg.num_key_value_heads
    sliding = cfg.sliding_layers()
    # Positions come from the KV cache (each query's position in its sequence), for a learned table
    # or for RoPE applied here; the VM functions keep their signatures.
    needs_positions = fam.positions == "learned" or fam.rope_in_model

    rms_norm_op, add_rms_norm_op = norm_ops

    class RMSNorm(nn.Module):
        """RMSNorm whose `add` form also takes the residual stream: one kernel returns the normalized sum
        and the sum itself (the residual for the next block). Every norm class has both forms."""

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

    class UnfusedAdd:
        """`add` of the norms without a fused kernel: (norm(x + residual), x + residual)."""

        def add(self, x, residual):
            total = x + residual
            return self(total), total

    class OnePlusRMSNorm(UnfusedAdd, nn.Module):
        """Gemma's RMSNorm: (x / rms(x)) * (1 + w), all in float32, then back to float16 (as HF)."""

        def __init__(self, dim: int):
            self.weight = nn.Parameter((dim,), "float16")

        def forward(self, x):
            w = self.weight.astype("float32") + 1.0
            return op.rms_norm(x.astype("float32"), w, axes=[-1], epsilon=cfg.rms_norm_eps).astype(x.dtype)

    class LayerNorm(UnfusedAdd, nn.Module):
        """LayerNorm with bias, computed in float32."""

        def __init__(self, dim: int):
            self.dim = dim
            self.weight = nn.Parameter((dim,), "float16")
            self.bias = nn.Parameter((dim,), "float16")

        def forward(self, x):
            y = op.layer_norm(x.astype("float32"), self.dim, self.weight.astype("float32"),
                              self.bias.astype("float32"), eps=cfg.rms_norm_eps)
            return y.astype(x.dtype)

    def norm(dim: int = cfg.hidden_size):
        if fam.norm == "rms_one_plus":
            return OnePlusRMSNorm(dim)
        if fam.norm == "layernorm":
            return LayerNorm(dim)
        assert dim == cfg.hidden_size, "the fused RMSNorm kernels normalize hidden_size"
        return RMSNorm()

    def rope(qkv, positions, theta: float, scaling: dict[str, Any]):
        """Rotate-half RoPE of the q and k heads of a fused [b, s, H + 2 KV, D] tensor, in float32
        (HF's cos/sin), for one base; `linear` scaling divides the positions by its factor."""
        from tvm import tirx
        from tvm.relax.frontend.nn.llm.position_embedding import switch_rope_freq_func

        factor = float(scaling.get("factor", 1.0)) if scaling.get("rope_type") == "linear" else 1.0
        freq_func = switch_rope_freq_func({} if scaling.get("rope_type") == "linear" else scaling)

        def f(x, pos):
            def value(b, s, h, d):
                p = pos[s].astype("float32") * tirx.const(1.0 / factor, "float32")
                cos, sin, bindings = freq_func(p, d, D, theta, "float32")
                half = tirx.if_then_else(d < D // 2, -x[b, s, h, d + D // 2], x[b, s, h, d - D // 2])
                out = cos * x[b, s, h, d].astype("float32") + sin * half.astype("float32")
                for var, val in bindings.items():
                    out = tirx.Let(var, val, out)
                return tirx.if_then_else(h < H + KV, out.astype(x.dtype), x[b, s, h, d])

            return te.compute(x.shape, value, name="rope")

        return op.tensor_expr_op(f, "rope", [qkv, positions])

    class Attention(nn.Module):
        def __init__(self):
            self.qkv_proj = linear(cfg.hidden_size, (H + 2 * KV) * D, cfg.qkv_bias)
            self.o_proj = linear(H * D, cfg.hidden_size, fam.linear_bias)
            if fam.qk_norm:
                self.q_norm, self.k_norm = norm(D), norm(D)

        def forward(self, x, kv, layer_id: int, positions):
            return self.o_proj(self.attend(self.qkv_proj(x), kv, layer_id, positions))

        def attend(self, qkv, kv, layer_id: int, positions):
            """[b, s, (H + 2 KV) D] projections -> [b, s, H D] attention output (before o_proj)."""
            b, s, _ = qkv.shape
            qkv = op.reshape(qkv, (b, s, H + 2 * KV, D))
            if fam.qk_norm:
                q, k, v = op.split(qkv, [H, H + KV], axis=2)
                qkv = op.concat([self.q_norm(q), self.k_norm(k), v], dim=2)
            if fam.rope_in_model:
                qkv = rope(qkv, positions, *cfg.layer_rope(layer_id))
            scale = cfg.attention_scale if cfg.attention_scale is not None else D ** -0.5
            out = kv.attention_with_fused_qkv(layer_id, qkv, H, sm_scale=scale)
            return op.reshape(out, (b, s, H * D))

    def act(x):
        if cfg.activation == "gelu_tanh":
            return op.gelu(x, approximate="tanh")
        return {"silu": op.silu, "gelu": op.gelu, "relu": op.relu}[cfg.activation](x)

    class MLP(nn.Module):
        def __init__(self):
            self.gate_up_proj = linear(cfg.hidden_size, 2 * cfg.intermediate_size, fam.linear_bias)
            self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size, fam.linear_bias)

        def forward(self, x):
            # gate_up's rows interleave gate and up (row 2j = gate_j, 2j + 1 = up_j; export/exporter.py), so
            # the decode GEMV can apply the activation in its epilogue (one kernel fewer per layer)
            p = self.gate_up_proj
            h = p.decode(x, glu=cfg.activation) if isinstance(p, W4Linear) else None
            return self.down_proj(self.gated(p(x)) if h is None else h)

        def stream(self, s, norm_weight):
            """Decode on the residual stream s: s + mlp(norm(s)), the norm inside gate_up's GEMV and the add
            inside down's (Layer.stream)."""
            norm = (norm_weight, cfg.rms_norm_eps)
            h = self.gate_up_proj.decode(s, norm=norm, glu=cfg.activation)
            if h is None:  # an activation without a gated epilogue
                h = self.gated(self.gate_up_proj.decode(s, norm=norm))
            return self.down_proj.decode(h, residual=s)

        @staticmethod
        def gated(y):
            """act(gate) * up of the interleaved projections."""
            pairs = op.reshape(y, (*y.shape[:-1], cfg.intermediate_size, 2))
            gate, up = op.split(pairs, 2, axis=-1)
            return op.reshape(act(gate) * up, (*y.shape[:-1], cfg.intermediate_size))

    class PlainMLP(nn.Module):
        """act(up(x)) -> down, no gate (OPT's fc1 -> relu -> fc2)."""

        def __init__(self):
            self.up_proj = linear(cfg.hidden_size, cfg.intermediate_size, fam.linear_bias)
            self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size, fam.linear_bias)

        def forward(self, x):
            return self.down_proj(act(self.up_proj(x)))

    mlp = MLP if fam.gated_mlp else PlainMLP

    class Layer(nn.Module):
        """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

        def __init__(self):
            self.input_layernorm = norm()
            self.self_attn = Attention()
            self.post_attention_layernorm = norm()
            self.mlp = mlp()

        def forward(self, h, residual, kv, layer_id: int, next_norm, positions=None):
            """h = input_layernorm(residual) on entry; returns (next_norm(new residual), new residual)."""
            h, residual = self.post_attention_layernorm.add(self.self_attn(h, kv, layer_id, positions), residual)
            return next_norm.add(self.mlp(h), residual)

        def stream(self, s, kv, layer_id: int, positions=None):
            """Decode (one token) on the residual stream s, returning the next: each add + RMSNorm runs inside
            the GEMVs around it (the norm as qkv's and gate_up's prologue, the add as o_proj's and down's
            epilogue), two kernels fewer per layer. Decoder.forward checks `fused_decode` first."""
            attn = self.self_attn
            qkv = attn.qkv_proj.decode(s, norm=(self.input_layernorm.weight, cfg.rms_norm_eps))
            s = attn.o_proj.decode(attn.attend(qkv, kv, layer_id, positions), residual=s)
            return self.mlp.stream(s, self.post_attention_layernorm.weight)

    class SandwichLayer(nn.Module):
        """Gemma3's block: the attention and MLP outputs are normed too before each residual add."""

        def __init__(self):
            self.input_layernorm = norm()
            self.self_attn = Attention()
            self.post_attention_layernorm = norm()
            self.pre_feedforward_layernorm = norm()
            self.mlp = mlp()
            self.post_feedforward_layernorm = norm()

        def forward(self, h, residual, kv, layer_id: int, next_norm, positions=None):
            """As Layer.forward: h = input_layernorm(residual) on entry."""
            attn = self.post_attention_layernorm(self.self_attn(h, kv, layer_id, positions))
            h, residual = self.pre_feedforward_layernorm.add(attn, residual)
            return next_norm.add(self.post_feedforward_layernorm(self.mlp(h)), residual)

    layer = SandwichLayer if fam.sandwich_norms else Layer

    def fused_decode(x) -> bool:
        """Whether this forward is one token of a pre-norm RMSNorm model whose W4 provider fuses the norms
        into the decode GEMVs (Layer.stream), and small enough to gain from it; other families, targets and
        sizes keep the norm kernels."""
        b, s, _ = x.shape
        return (cfg.group_size is not None and getattr(linear_op, "decode", None) is not None
                and cfg.hidden_size <= FUSED_NORMS_MAX_HIDDEN
                and layer is Layer and fam.norm == "rms" and fam.gated_mlp and not fam.linear_bias
                and not fam.qk_norm and isinstance(b, int) and isinstance(s, int) and b * s == 1)

    def link_decode_chain(layers):
        """Each W4 linear learns the next one a decode step runs (qkv, o, gate_up / up, down, the next layer's
        qkv), whose leading rows its GEMV prefetches into L2 where the provider does that (sm_90)."""
        chain = []
        for lyr in layers:
            m = lyr.mlp
            chain += [(lyr.self_attn.qkv_proj, True), (lyr.self_attn.o_proj, False),
                      (m.gate_up_proj if hasattr(m, "gate_up_proj") else m.up_proj, False), (m.down_proj, False)]
        for (a, after_attention), (b, _) in zip(chain, chain[1:]):
            if isinstance(a, W4Linear) and isinstance(b, W4Linear):
                a.prefetch_next(b, after_attention)

    class Decoder(nn.Module):
        def __init__(self):
            tied_int8 = int8_head and cfg.tie_word_embeddings
            self.embed_tokens = Int8Table() if tied_int8 else nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                                                           dtype="float16")
            if fam.positions == "learned":
                self.embed_positions = nn.Embedding(cfg.max_position_embeddings + fam.position_offset,
                                                    cfg.hidden_size, dtype="float16")
            self.layers = nn.ModuleList([layer() for _ in range(cfg.num_hidden_layers)])
            self.norm = norm()
            link_decode_chain(self.layers)

        def forward(self, x, kv):
            positions = None
            if needs_positions:
                b, s, d = x.shape
                positions = kv.get_query_positions(b * s)
            if fam.positions == "learned":
                pos = op.take(self.embed_positions.weight, positions + fam.position_offset, axis=0)
                x = x + op.reshape(pos, x.shape)
            layers = list(self.layers)
            if fused_decode(x):
                for i, layer_ in enumerate(layers):
                    x = layer_.stream(x, kv, i, positions)
                return self.norm(x)
            h, residual = layers[0].input_layernorm(x), x
            for i, layer_ in enumerate(layers):
                nxt = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.norm
                h, residual = layer_(h, residual, kv, i, nxt, positions)
            return h

    class CausalLM(nn.Module):
        def __init__(self):
            self.model = Decoder()
            # lm_head stays FP16 (as AWQ keeps it) unless cfg.lm_head is "int8"; tied models reuse the
            # embedding table.
            head = Int8Table if int8_head else lambda: Linear(cfg.hidden_size, cfg.vocab_size, False)
            self.lm_head = None if cfg.tie_word_embeddings else head()

        def _logits(self, h):
            if int8_head:
                return (self.model.embed_tokens if self.lm_head is None else self.lm_head).logits(h)
            w = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
            # float32 accumulation: logits feed argmax/sampling and perplexity directly.
            return matmul_nt(h, w, "float32")

        def embed(self, input_ids):
            x = self.model.embed_tokens(input_ids)
            if fam.embed_scale:  # HF rounds the factor to the embedding dtype first
                x = x * float(np.float16(cfg.hidden_size ** 0.5))
            return x

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

        def argmax(self, logits):
            return argmax_op(logits)

        def sample(self, logits, cfg, rng, seen):
            return sample_op(logits, cfg, rng, seen)

        def create_kv_cache(self, max_batch_size, max_total_seq_len, prefill_chunk_size, page_size,
                            support_sliding_window):
            # NORMAL: rotate-half RoPE applied to q and k before k enters the cache (as HF Llama);
            # NONE: no RoPE (learned positions) or RoPE already applied by the module.
            mode = RopeMode.NORMAL if fam.positions == "rope" and not fam.rope_in_model else RopeMode.NONE
            window = {"layer_sliding_window_size": cfg.sliding_window} if any(sliding) else {}
            with attention_kernels(mode) if attention_kernels else contextlib.nullcontext():
                return TIRPagedKVCache(
                    attn_kind=["mha_sliding" if s else "mha" for s in sliding] if any(sliding) else "mha",
                    max_batch_size=max_batch_size, max_total_seq_len=max_total_seq_len,
                    prefill_chunk_size=prefill_chunk_size, page_size=page_size,
                    support_sliding_window=support_sliding_window,
                    layer_partition=rx.ShapeExpr([0, cfg.num_hidden_layers]),
                    num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=H, num_key_value_heads=KV,
                    qk_head_dim=D, v_head_dim=D, mla_original_qk_head_dim=0, mla_original_v_head_dim=0,
                    rope_mode=mode, rope_scale=1, rope_theta=cfg.rope_theta,
                    rope_scaling=dict(cfg.rope_scaling) if mode == RopeMode.NORMAL else {},
                    rope_ext_factors=rx.prim_value(0), rotary_dim=D,
                    enable_disaggregation=False, dtype="float16", target=Target.current(), **window,
                )

    def spec():
        packed = {"param_mode": "packed", "effect_mode": "none"}
        kv = nn.spec.Object(object_type=PagedKVCache)
        hid = cfg.hidden_size
        functions = {
            "embed": {"input_ids": nn.spec.Tensor(["seq_len"], "int32"), "$": packed},
            "prefill": {"embeds": nn.spec.Tensor([1, "seq_len", hid], "float16"), "kv": kv, "$": packed},
            "prefill_logits": {"embeds": nn.spec.Tensor([1, "seq_len", hid], "float16"), "kv": kv, "$": packed},
            "decode": {"embeds": nn.spec.Tensor([1, 1, hid], "float16"), "kv": kv, "$": packed},
            "create_kv_cache": {
                "max_batch_size": int, "max_total_seq_len": int, "prefill_chunk_size": int, "page_size": int,
                "support_sliding_window": int, "$": {"param_mode": "none", "effect_mode": "none"},
            },
        }
        if argmax_op is not None:
            functions["argmax"] = {"logits": nn.spec.Tensor([1, 1, cfg.vocab_size], "float32"),
                                   "$": {"param_mode": "none", "effect_mode": "none"}}
        if sample_op is not None:
            functions["sample"] = {"logits": nn.spec.Tensor([1, 1, cfg.vocab_size], "float32"),
                                   "cfg": nn.spec.Tensor([4], "float32"), "rng": nn.spec.Tensor([2], "int32"),
                                   "seen": nn.spec.Tensor([cfg.vocab_size], "int32"),
                                   "$": {"param_mode": "none", "effect_mode": "none"}}
        return functions

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
    "argmax": {"inputs": ["logits float32[1, 1, vocab]"], "outputs": ["int32[1]"],
               "doc": "the greedy token on the device (lowest id among equal maxima): a decode-step graph feeds it "
                      "to the next step itself (runtime/cuda_graph.py)"},
    "sample": {"inputs": ["logits float32[1, 1, vocab]", "cfg float32[4]", "rng int32[2]", "seen int32[vocab]"],
               "outputs": ["int32[1]"],
               "doc": "a sampled token on the device (CUDA exports only): cfg = [temperature (0: greedy), top_p, "
                      "top_k, repetition_penalty], rng = [seed, counter], seen = 1 for the ids in the history; the "
                      "counter advances and the token is marked seen in place; tvm_kernels/sample.py"},
}


def functions_of(device_target) -> dict:
    """The manifest's functions for an export to `device_target` (`sample` is built for CUDA only)."""
    return {k: v for k, v in FUNCTIONS.items() if k != "sample" or device_target.is_cuda}
