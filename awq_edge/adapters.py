"""Model families as data: where the decoder layers are and which ops AWQ may scale together.

A scaling pair says: the output of `prev` feeds exactly the `linears` (and nothing else that is not
invariant to a per-channel scale), so dividing `prev`'s output channels by s and multiplying the
linears' input channels by s leaves the block's output unchanged. `inspect` is the module whose
output measures the quantization loss of the pair; its input is the linears' input.
Adding a family means adding one `Adapter(...)` entry below, never a code branch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from awq_edge.errors import UserError


@dataclass(frozen=True)
class ScalingPair:
    prev: str
    linears: tuple[str, ...]
    inspect: str
    # llm-awq applies v->o only when v's outputs map one to one onto o's inputs; under GQA one
    # v channel feeds several heads' o inputs and a per-input-channel s of o cannot be folded.
    requires_same_width: bool = False


@dataclass(frozen=True)
class Adapter:
    name: str
    model_types: tuple[str, ...]
    layers_path: str
    pairs: tuple[ScalingPair, ...]
    norm: str  # "rms" | "rms_one_plus" | "layernorm"
    # Module names left in FP16, matched as a dotted-name component like transformers'
    # modules_to_not_convert ("visual" matches "model.visual.blocks.0.mlp").
    not_convert: tuple[str, ...] = ()
    # Linears of a layer that belong to no scaling pair but are still quantized.
    extra_linears: tuple[str, ...] = ()
    # Config attributes that must hold for the pairs above to be valid.
    requires: tuple[tuple[str, Any], ...] = ()
    # Linears whose clipping llm-awq skips: q/k feed a softmax through a dot product, and
    # clipping their outliers hurts more than the rounding it saves.
    no_clip: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")

    def linear_names(self) -> list[str]:
        names: list[str] = []
        for pair in self.pairs:
            for n in pair.linears:
                if n not in names:
                    names.append(n)
        names += [n for n in self.extra_linears if n not in names]
        return names


_ATTN_IN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")

# Pre-norm Llama-style block: norm -> q,k,v | v -> o | norm -> gate,up | up -> down.
_LLAMA_PAIRS = (
    ScalingPair("input_layernorm", _ATTN_IN, "self_attn"),
    ScalingPair("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", requires_same_width=True),
    ScalingPair("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScalingPair("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)

# Gemma3 norms the attention and MLP *outputs* too (post_attention_layernorm,
# post_feedforward_layernorm); the MLP input norm is pre_feedforward_layernorm.
_GEMMA3_PAIRS = (
    ScalingPair("input_layernorm", _ATTN_IN, "self_attn"),
    ScalingPair("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", requires_same_width=True),
    ScalingPair("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScalingPair("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)

# OPT (pre-LN variants): fc1 -> ReLU -> fc2 is foldable because ReLU(x / s) = ReLU(x) / s for s > 0.
_OPT_PAIRS = (
    ScalingPair("self_attn_layer_norm", _ATTN_IN, "self_attn"),
    ScalingPair("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj", requires_same_width=True),
    ScalingPair("final_layer_norm", ("fc1",), "fc1"),
    ScalingPair("fc1", ("fc2",), "fc2"),
)

ADAPTERS: tuple[Adapter, ...] = (
    Adapter("llama", ("llama", "mistral"), "model.layers", _LLAMA_PAIRS, "rms"),
    Adapter("qwen2", ("qwen2",), "model.layers", _LLAMA_PAIRS, "rms"),
    Adapter("qwen2_5_vl", ("qwen2_5_vl",), "model.language_model.layers", _LLAMA_PAIRS, "rms",
            not_convert=("visual",)),
    Adapter("gemma3_text", ("gemma3_text",), "model.layers", _GEMMA3_PAIRS, "rms_one_plus"),
    Adapter("gemma3", ("gemma3",), "model.language_model.layers", _GEMMA3_PAIRS, "rms_one_plus",
            not_convert=("vision_tower", "multi_modal_projector")),
    Adapter("opt", ("opt",), "model.decoder.layers", _OPT_PAIRS, "layernorm",
            requires=(("do_layer_norm_before", True), ("activation_function", "relu")),
            no_clip=("self_attn.q_proj", "self_attn.k_proj")),
)


def supported_model_types() -> list[str]:
    return sorted({t for a in ADAPTERS for t in a.model_types})


def get_adapter(config) -> Adapter:
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            for attr, want in adapter.requires:
                have = getattr(config, attr, None)
                if have != want:
                    raise UserError(f"{model_type} with {attr}={have!r} is not supported (AWQ's {adapter.name} "
                                    f"scaling pairs need {attr}={want!r})")
            return adapter
    raise UserError(f"unknown architecture {model_type!r}; supported: {', '.join(supported_model_types())}")


def get_submodule(root, path: str):
    """`root.a.b.c` for path "a.b.c" (ModuleList indices included), with a clear error."""
    module = root
    for part in path.split("."):
        if not hasattr(module, part):
            raise UserError(f"{type(root).__name__} has no module {path!r} (stopped at {part!r})")
        module = getattr(module, part)
    return module


def get_layers(model, adapter: Adapter):
    return get_submodule(model, adapter.layers_path)


def pair_applies(layer, pair: ScalingPair) -> bool:
    if not pair.requires_same_width:
        return True
    prev = get_submodule(layer, pair.prev)
    return all(get_submodule(layer, n).in_features == prev.out_features for n in pair.linears)


def iter_quantized_linears(model, adapter: Adapter) -> Iterator[tuple[str, "torch.nn.Linear"]]:  # noqa: F821
    import torch

    for i, layer in enumerate(get_layers(model, adapter)):
        for rel in adapter.linear_names():
            full = f"{adapter.layers_path}.{i}.{rel}"
            if any(skip in full.split(".") for skip in adapter.not_convert):
                continue
            linear = get_submodule(layer, rel)
            if not isinstance(linear, torch.nn.Linear):
                raise UserError(f"{full} is a {type(linear).__name__}, expected a Linear layer")
            yield full, linear
