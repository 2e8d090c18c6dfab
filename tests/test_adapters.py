"""Family adapters: lookup, linear names, and that every declared scaling pair folds exactly."""
import pytest
import torch

from awq_edge.adapters import ADAPTERS, get_adapter, get_layers, get_submodule, iter_quantized_linears, pair_applies
from awq_edge.errors import UserError
from awq_edge.quantizer import fold_scales
from tiny_models import FAMILIES, tiny_config, tiny_model


def test_unknown_architecture_is_a_user_error():
    from transformers import BertConfig

    with pytest.raises(UserError, match="unknown architecture 'bert'; supported: .*llama"):
        get_adapter(BertConfig())


def test_post_layernorm_opt_is_rejected():
    with pytest.raises(UserError, match="do_layer_norm_before"):
        get_adapter(tiny_config("opt", do_layer_norm_before=False))


def test_every_model_type_has_one_adapter():
    seen = [t for a in ADAPTERS for t in a.model_types]
    assert len(seen) == len(set(seen))


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_linears_are_the_layer_linears(family):
    model, config = tiny_model(family)
    adapter = get_adapter(config)
    names = [n for n, _ in iter_quantized_linears(model, adapter)]
    layers = get_layers(model, adapter)
    expected = []
    for i, layer in enumerate(layers):
        expected += [f"{adapter.layers_path}.{i}.{n}" for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(names) == sorted(expected)
    assert all(dict(model.named_modules())[n] is m for n, m in iter_quantized_linears(model, adapter))
    if family == "qwen2_5_vl":
        assert "visual" in adapter.not_convert
        assert not any("visual" in n for n in names)


def test_gqa_skips_v_to_o():
    model, config = tiny_model("llama")  # 4 query heads, 2 kv heads
    layer = get_layers(model, get_adapter(config))[0]
    v_to_o = [p for p in get_adapter(config).pairs if p.prev == "self_attn.v_proj"][0]
    assert not pair_applies(layer, v_to_o)
    model, config = tiny_model("qwen2")  # no GQA
    assert pair_applies(get_layers(model, get_adapter(config))[0], v_to_o)


@pytest.mark.parametrize("family", FAMILIES)
def test_scale_folding_preserves_outputs(family):
    model, config = tiny_model(family)
    adapter = get_adapter(config)
    ids = torch.randint(0, config.get_text_config().vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    gen = torch.Generator().manual_seed(1)
    folded = 0
    for layer in get_layers(model, adapter):
        for pair in adapter.pairs:
            if not pair_applies(layer, pair):
                continue
            n = get_submodule(layer, pair.linears[0]).in_features
            s = torch.exp(0.7 * torch.randn(n, generator=gen))  # a wide, positive range of scales
            fold_scales(layer, pair, s, adapter.norm)
            folded += 1
    with torch.no_grad():
        out = model(ids).logits
    assert folded >= 3 * len(get_layers(model, adapter))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)
