"""Tiny random models of every supported family, built from transformers configs (fp32, CPU).

Sizes are multiples of 64 (group size) and of 8 (int4 packing) so that every quantization and
packing path runs on them. `tiny_model(family)` -> (model, config); `FAMILIES` lists the names.
The models are randomly initialised with a fixed seed; they are for numerics, not for text.
"""
from __future__ import annotations

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen2_5_vl", "gemma3", "opt")

HIDDEN = 128
INTERMEDIATE = 256
LAYERS = 2
VOCAB = 256


def tiny_config(family: str, **overrides):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if family == "llama":
        cfg = tf.LlamaConfig(**common, tie_word_embeddings=True)
    elif family == "mistral":
        cfg = tf.MistralConfig(**common, sliding_window=None)
    elif family == "qwen2":
        # No GQA here so that the v->o pair is exercised too.
        cfg = tf.Qwen2Config(**{**common, "num_key_value_heads": 4})
    elif family == "qwen2_5_vl":
        # Image/video token ids stay outside the vocabulary: text-only inputs never hit them.
        text = dict(common, model_type="qwen2_5_vl_text", bos_token_id=0, eos_token_id=1,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]})
        vision = dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=HIDDEN,
                      fullatt_block_indexes=[0], patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision)
    elif family == "gemma3":
        cfg = tf.Gemma3TextConfig(**common, head_dim=32, sliding_window=16,
                                  layer_types=["sliding_attention", "full_attention"][:LAYERS])
    elif family == "opt":
        cfg = tf.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=INTERMEDIATE, num_hidden_layers=LAYERS,
                           num_attention_heads=4, max_position_embeddings=512, word_embed_proj_dim=HIDDEN,
                           activation_function="relu", do_layer_norm_before=True)
    else:
        raise ValueError(f"unknown tiny family {family!r}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def _randomize_norms(model: torch.nn.Module, gen: torch.Generator) -> None:
    # Fresh norms are all ones (or zeros for Gemma's 1+w); random values make folding tests bite.
    for name, p in model.named_parameters():
        if "norm" in name:
            with torch.no_grad():
                p.add_(0.3 * torch.randn(p.shape, generator=gen))


def tiny_model(family: str, seed: int = 0, **overrides):
    import transformers as tf

    cfg = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    if family == "qwen2_5_vl":
        model = tf.Qwen2_5_VLForConditionalGeneration(cfg).float()
    else:
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _randomize_norms(model, torch.Generator().manual_seed(seed + 1))
    model.eval()
    return model, model.config
