"""AWQ core numerics on tiny random models: quantization math, clip search, capture, AWQ vs RTN."""
import numpy as np
import pytest
import torch

from awq_edge.adapters import get_adapter, get_layers, iter_quantized_linears
from awq_edge.errors import UserError
from awq_edge.quantizer import (QuantConfig, _capture_inputs, _first, pseudo_quantize, quantize_model,
                                quantize_weight, search_clip)
from tiny_models import FAMILIES, tiny_model


def np_pseudo_quantize(w: np.ndarray, bits: int, group: int, zero_point: bool) -> np.ndarray:
    """Independent reference: asymmetric (or symmetric) round-to-nearest per group, in float32."""
    g = w.astype(np.float32).reshape(-1, group)
    if zero_point:
        hi, lo = g.max(1, keepdims=True), g.min(1, keepdims=True)
        s = np.maximum(hi - lo, np.float32(1e-5)) / np.float32(2**bits - 1)
        z = np.clip(-np.round(lo / s), 0, 2**bits - 1)
        q = np.clip(np.round(g / s) + z, 0, 2**bits - 1)
        return ((q - z) * s).reshape(w.shape)
    s = np.maximum(np.abs(g).max(1, keepdims=True), np.float32(1e-5)) / np.float32(2 ** (bits - 1) - 1)
    q = np.clip(np.round(g / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return (q * s).reshape(w.shape)


@pytest.mark.parametrize("bits,group,zero_point", [(4, 64, True), (3, 32, True), (4, 128, False), (8, 64, True)])
def test_pseudo_quantize_matches_numpy(bits, group, zero_point):
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(bits + group)) * 0.05
    w[3, :64] = 0.0  # a constant group: the scale floor must keep it finite
    w_dq, scales, zeros = pseudo_quantize(w, bits, group, zero_point)
    ref = np_pseudo_quantize(w.numpy(), bits, group, zero_point)
    np.testing.assert_allclose(w_dq.numpy(), ref, rtol=0, atol=1e-7)
    assert scales.shape == zeros.shape == (48, 256 // group)
    # the integer view reproduces the fake-quantized weight
    q = torch.clamp(torch.round(w.reshape(-1, group) / scales.reshape(-1, 1)) + zeros.reshape(-1, 1), 0, 2**bits - 1)
    torch.testing.assert_close(((q - zeros.reshape(-1, 1)) * scales.reshape(-1, 1)).reshape(w.shape), w_dq)


def test_quantize_weight_integers_and_fp16_scales():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    ql, w_dq = quantize_weight(w, 4, 64)
    assert ql.intweight.dtype == torch.uint8 and int(ql.intweight.max()) <= 15
    assert ql.scales.dtype == torch.float16 and ql.scales.shape == (32, 2)
    assert ql.zeros.dtype == torch.uint8 and int(ql.zeros.max()) <= 15
    torch.testing.assert_close(ql.dequantize(), w_dq, rtol=0, atol=0)
    # the same grid as the fake quantizer, up to rounding the scale to fp16 (which can move a value
    # sitting near a rounding boundary by one step)
    _assert_same_grid(w_dq, w, 4, 64)


def _assert_same_grid(w_dq, w, bits, group):
    """w_dq is pseudo_quantize(w) up to the fp16 rounding of the scale, which can move a value
    sitting on a rounding boundary by one step."""
    fake, scales, _ = pseudo_quantize(w, bits, group)
    steps = ((w_dq - fake) / scales.repeat_interleave(group, dim=1)).abs()
    assert float(steps.max()) < 1.01 and float((steps > 0.01).float().mean()) < 0.001


def np_best_clip(w, x, bits, group, grid, max_shrink):
    """Brute-force reference of the clip search, one (row, group) at a time."""
    n_out, n_in = w.shape
    best = np.zeros((n_out, n_in // group), dtype=np.float32)
    for o in range(n_out):
        for gi in range(n_in // group):
            wg = w[o, gi * group:(gi + 1) * group]
            xg = x[:, gi * group:(gi + 1) * group]
            amax = np.abs(wg).max()
            errs = []
            for i in range(int(max_shrink * grid)):
                m = np.float32(amax * (1 - i / grid))
                q = np_pseudo_quantize(np.clip(wg, -m, m)[None], bits, group, True)[0]
                errs.append(((xg @ (q - wg)) ** 2).mean())
            best[o, gi] = amax * (1 - int(np.argmin(errs)) / grid)
    return best


def test_clip_search_matches_brute_force():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 128, generator=gen)
    w[:, 5] *= 6  # outliers worth clipping
    x = torch.randn(40, 128, generator=gen)
    cfg = QuantConfig(w_bit=3, group_size=64)
    got = search_clip(w, x, cfg, max_elems=64 * 2 * 40 * 3)  # forces several output-channel batches
    ref = np_best_clip(w.numpy(), x.numpy().astype(np.float64), 3, 64, cfg.clip_grid, cfg.clip_max_shrink)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5)
    assert (got < w.reshape(6, 2, 64).abs().amax(-1)).any()


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_inputs_replay_the_model(family):
    """Layer-0 inputs + each layer's captured kwargs, run layer by layer, give the model's hidden states."""
    model, config = tiny_model(family)
    layers = get_layers(model, get_adapter(config))
    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(0))  # 40 > gemma's window 16
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states
        hidden, calls = _capture_inputs(model, layers, [ids[:2], ids[2:]])
        for c, h in enumerate(hidden):
            rows = slice(0, 2) if c == 0 else slice(2, 3)
            for i, layer in enumerate(layers):
                torch.testing.assert_close(h, states[i][rows], rtol=1e-5, atol=1e-5)
                args, kwargs = calls[c][i]
                h = _first(layer(h, *args, **kwargs))


def _check_int_parts(model, adapter, results, bits, group):
    names = [n for n, _ in iter_quantized_linears(model, adapter)]
    assert sorted(results) == sorted(names)
    for name, lin in iter_quantized_linears(model, adapter):
        ql = results[name]
        assert ql.intweight.shape == lin.weight.shape and ql.intweight.dtype == torch.uint8
        assert int(ql.intweight.max()) < 2**bits and int(ql.zeros.max()) < 2**bits
        assert ql.scales.shape == (lin.out_features, lin.in_features // group) and ql.scales.dtype == torch.float16
        torch.testing.assert_close(ql.dequantize(), lin.weight.data, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_awq_int_parts_equal_the_weights_left_in_the_model(family):
    model, config = tiny_model(family)
    adapter = get_adapter(config)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    untouched = {n: p.detach().clone() for n, p in model.named_parameters()
                 if not n.startswith(adapter.layers_path + ".")}  # embeddings, lm_head, vision tower
    cfg = QuantConfig(w_bit=4, group_size=64, n_grid=4, clip_grid=8, chunk_tokens=64)
    results = quantize_model(model, adapter, ids, cfg, progress=False)
    _check_int_parts(model, adapter, results, 4, 64)
    params = dict(model.named_parameters())
    for n, p in untouched.items():
        assert torch.equal(params[n], p), n
    with torch.no_grad():
        out = model(ids).logits
    # the fake-quant model is still the same model, only slightly perturbed
    assert (out - ref).pow(2).mean() < 0.1 * ref.pow(2).mean()


def test_rtn_needs_no_calibration_and_is_plain_rounding():
    model, config = tiny_model("llama")
    adapter = get_adapter(config)
    before = {n: lin.weight.detach().clone() for n, lin in iter_quantized_linears(model, adapter)}
    results = quantize_model(model, adapter, None, QuantConfig(w_bit=3, group_size=32, method="rtn"), progress=False)
    _check_int_parts(model, adapter, results, 3, 32)
    for name, lin in iter_quantized_linears(model, adapter):
        _assert_same_grid(lin.weight.data, before[name], 3, 32)


def _plant_salient_channels(model, adapter, n_salient=4, factor=30.0):
    """Make a few input channels carry 30x larger activations and 30x smaller weights.

    The model computes the same function, but round-to-nearest now wipes out exactly the weights
    that multiply the largest activations: the case AWQ's scaling is designed for.
    """
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in get_layers(model, adapter):
            for pair in adapter.pairs[::2]:  # the two norm -> linears pairs
                ch = torch.randperm(layer.input_layernorm.weight.numel(), generator=gen)[:n_salient]
                layer.get_submodule(pair.prev).weight[ch] *= factor
                for name in pair.linears:
                    layer.get_submodule(name).weight[:, ch] /= factor


def test_awq_beats_rtn_with_salient_channels():
    errors = {}
    for method in ("rtn", "awq"):
        model, config = tiny_model("llama", seed=3)
        adapter = get_adapter(config)
        _plant_salient_channels(model, adapter)
        calib = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))
        held_out = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            ref = model(held_out).logits
        quantize_model(model, adapter, calib if method == "awq" else None,
                       QuantConfig(w_bit=3, group_size=64, method=method), progress=False)
        with torch.no_grad():
            errors[method] = (model(held_out).logits - ref).pow(2).mean().item()
    assert errors["awq"] < 0.5 * errors["rtn"], errors


def test_bad_settings_are_user_errors():
    model, config = tiny_model("llama")
    adapter = get_adapter(config)
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(UserError, match="group-size 96 does not divide the 128 input channels of model.layers.0"):
        quantize_model(model, adapter, ids, QuantConfig(group_size=96), progress=False)
    with pytest.raises(UserError, match="calibration"):
        quantize_model(model, adapter, None, QuantConfig(group_size=64), progress=False)
    with pytest.raises(UserError, match="--method"):
        quantize_model(model, adapter, ids, QuantConfig(group_size=64, method="gptq"), progress=False)
