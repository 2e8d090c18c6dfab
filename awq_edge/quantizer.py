"""AWQ: activation-aware per-channel scaling, clip search and asymmetric group quantization.

Layer by layer (Lin et al., MLSys 2024; AutoAWQ's variant of the search):
  1. capture the decoder layer's real inputs once (embeddings -> layer 0), with the keyword arguments
     each layer receives (rotary tables, masks);
  2. run the layer, recording the input of every scaling pair's linears;
  3. per scaling pair, grid-search s = mean|x|^a (/ mean|w|^(1-a) with duo scaling), quantize W*s,
     measure the MSE of the `inspect` module's output, fold the best s into prev / linears;
  4. per linear (except q/k), search a per-group clip of the weight range that minimises the
     output error on a token subsample;
  5. quantize, write the dequantized weight back into the model, keep the integers;
  6. run the layer again to make the next layer's inputs.
The model itself stays where it is (CPU); only the current layer and its activations go to `device`.
"""
from __future__ import annotations

import inspect as _inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from awq_edge.adapters import Adapter, ScalingPair, get_layers, get_submodule, pair_applies
from awq_edge.errors import UserError


@dataclass
class QuantConfig:
    w_bit: int = 4
    group_size: int = 128
    zero_point: bool = True
    method: str = "awq"  # "awq" | "rtn"
    n_grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    clip_max_shrink: float = 0.5
    clip_tokens: int = 512
    # AutoAWQ's scale s = x^a / w^(1-a); False gives llm-awq's s = x^a.
    duo_scaling: bool = True
    # Calibration tokens per forward chunk: bounds activation memory, independent of sample count.
    chunk_tokens: int = 8192
    # "quant": next layer sees the quantized layer's output (errors of earlier layers are visible to
    # later searches); "fp": the unquantized output, as AutoAWQ does.
    next_inputs: str = "quant"


@dataclass
class QuantizedLinear:
    intweight: torch.Tensor  # uint8 [out, in], values in [0, 2**w_bit)
    scales: torch.Tensor  # float16 [out, in // group]
    zeros: torch.Tensor  # uint8 [out, in // group]   (W = (q - z) * s)

    def dequantize(self) -> torch.Tensor:
        g = self.intweight.shape[1] // self.scales.shape[1]
        s = self.scales.float().repeat_interleave(g, dim=1)
        z = self.zeros.float().repeat_interleave(g, dim=1)
        return (self.intweight.float() - z) * s


# ----------------------------------------------------------------------------------------------
# Quantization math


def _group_params(w: torch.Tensor, w_bit: int, zero_point: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (group) scale and integer zero point of w [n_groups, group] -> ([n,1], [n,1])."""
    if zero_point:
        max_val = w.amax(dim=1, keepdim=True)
        min_val = w.amin(dim=1, keepdim=True)
        scales = (max_val - min_val).clamp(min=1e-5) / (2**w_bit - 1)
        zeros = (-torch.round(min_val / scales)).clamp(0, 2**w_bit - 1)
    else:
        # Symmetric: q in [-2^(b-1), 2^(b-1)-1] stored unsigned with the fixed zero point 2^(b-1).
        scales = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-5) / (2 ** (w_bit - 1) - 1)
        zeros = torch.full_like(scales, 2 ** (w_bit - 1))
    return scales, zeros


def pseudo_quantize(w: torch.Tensor, w_bit: int, group_size: int, zero_point: bool = True):
    """Fake-quantize w [out, in] per group of `group_size` input channels.

    Returns (w_dequant [out, in], scales [out, in/G], zeros [out, in/G]) with
    w_dequant = (clamp(round(w / s) + z, 0, 2^b - 1) - z) * s (AutoAWQ's math).
    """
    shape = w.shape
    wg = w.reshape(-1, group_size)
    scales, zeros = _group_params(wg, w_bit, zero_point)
    q = torch.clamp(torch.round(wg / scales) + zeros, 0, 2**w_bit - 1)
    w_dq = ((q - zeros) * scales).reshape(shape)
    return w_dq, scales.reshape(shape[0], -1), zeros.reshape(shape[0], -1)


def quantize_weight(w: torch.Tensor, w_bit: int, group_size: int, zero_point: bool = True):
    """Integer quantization of w [out, in] with fp16 scales -> (QuantizedLinear on CPU, w_dequant like w).

    The scale is rounded to fp16 *before* the integers are chosen, so that (q - z) * s with the
    stored fp16 scale is exactly the weight this function returns.
    """
    out_f, in_f = w.shape
    wg = w.float().reshape(-1, group_size)
    scales, zeros = _group_params(wg, w_bit, zero_point)
    scales = scales.half().float().clamp(min=2.0**-24)  # fp16-representable and nonzero
    if zero_point:
        zeros = (-torch.round(wg.amin(dim=1, keepdim=True) / scales)).clamp(0, 2**w_bit - 1)
    q = torch.clamp(torch.round(wg / scales) + zeros, 0, 2**w_bit - 1)
    w_dq = ((q - zeros) * scales).reshape(out_f, in_f).to(w.dtype)
    ql = QuantizedLinear(
        intweight=q.reshape(out_f, in_f).to(torch.uint8).cpu(),
        scales=scales.reshape(out_f, -1).half().cpu(),
        zeros=zeros.reshape(out_f, -1).to(torch.uint8).cpu(),
    )
    return ql, w_dq


# ----------------------------------------------------------------------------------------------
# Capturing layer inputs


class _StopForward(Exception):
    pass


def _to(obj: Any, device, dtype=None):
    """Move tensors inside (nested) args to device; cast floating tensors to dtype when given."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device, dtype) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


@torch.no_grad()
def _capture_inputs(model, layers, chunks: list[torch.Tensor]):
    """Run the model's front (embeddings, rotary tables, masks) on each calibration chunk.

    Every decoder layer is replaced by a recorder that passes its input through, and the last one
    stops the forward (the lm_head is never run). Returns the first layer's hidden states per
    chunk and the (args, kwargs) each layer got per chunk: layers of one model may get different
    masks / rotary tables (Gemma3's sliding vs global layers).
    """
    hidden: list[torch.Tensor] = []
    calls: list[list[tuple[tuple, dict]]] = []
    current: list[tuple[tuple, dict]] = []

    def make_recorder(idx: int):
        def forward(*args, **kwargs):
            if args:
                hs, rest = args[0], args[1:]
            else:
                hs, rest = kwargs.pop("hidden_states"), ()
            if idx == 0:
                hidden.append(hs)
            current.append((rest, kwargs))
            if idx == len(layers) - 1:
                raise _StopForward
            return hs

        return forward

    for i, layer in enumerate(layers):
        layer.forward = make_recorder(i)
    try:
        for ids in chunks:
            current = []
            try:
                model(input_ids=ids, use_cache=False)
            except _StopForward:
                pass
            if len(current) != len(layers):
                raise RuntimeError(f"captured {len(current)} of {len(layers)} decoder layer calls")
            calls.append(current)
    finally:
        for layer in layers:
            del layer.forward
    return hidden, calls


# ----------------------------------------------------------------------------------------------
# Running pieces of a layer


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _accepted_kwargs(module: nn.Module, kwargs: dict) -> dict:
    """The subset of a layer's kwargs that `module.forward` takes (all of them if it has **kwargs)."""
    params = _inspect.signature(module.forward).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _run_inspect(module: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    return _first(module(x, **_accepted_kwargs(module, kwargs)))


# ----------------------------------------------------------------------------------------------
# Scale search and folding


def _scale_candidates(x_mean: torch.Tensor, w_mean: torch.Tensor | None, n_grid: int):
    for r in range(n_grid):
        a = r / n_grid
        if w_mean is not None:
            s = (x_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4)).clamp(min=1e-4)
        else:
            s = x_mean.pow(a).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        s[~torch.isfinite(s)] = 1
        yield a, s


@torch.no_grad()
def _search_scale(layer, pair: ScalingPair, xs: list[torch.Tensor], kws: list[dict], cfg: QuantConfig):
    linears = [get_submodule(layer, n) for n in pair.linears]
    module = get_submodule(layer, pair.inspect)
    n_ch = xs[0].shape[-1]

    x_sum = torch.zeros(n_ch, dtype=torch.float32, device=xs[0].device)
    n_tok = 0
    for x in xs:
        xf = x.reshape(-1, n_ch)
        x_sum += xf.abs().float().sum(0)
        n_tok += xf.shape[0]
    x_mean = x_sum / n_tok

    w_mean = None
    if cfg.duo_scaling:
        w = torch.cat([lin.weight for lin in linears], dim=0).float().reshape(-1, cfg.group_size).abs()
        w_mean = (w / (w.amax(dim=1, keepdim=True) + 1e-6)).reshape(-1, n_ch).mean(0)

    ref = [_run_inspect(module, x, kw) for x, kw in zip(xs, kws)]
    n_out = sum(r.numel() for r in ref)
    originals = [lin.weight.data.clone() for lin in linears]
    best = (float("inf"), None)
    try:
        for _, s in _scale_candidates(x_mean, w_mean, cfg.n_grid):
            sv = s.view(1, -1)
            for lin, w0 in zip(linears, originals):
                w_s = w0.float() * sv
                lin.weight.data = (pseudo_quantize(w_s, cfg.w_bit, cfg.group_size, cfg.zero_point)[0] / sv).to(w0.dtype)
            loss = torch.zeros((), dtype=torch.float32, device=x_sum.device)
            for x, kw, r in zip(xs, kws, ref):
                loss += (_run_inspect(module, x, kw).float() - r.float()).pow(2).sum()
            loss = loss.item() / n_out
            if loss < best[0]:
                best = (loss, s)
    finally:
        for lin, w0 in zip(linears, originals):
            lin.weight.data = w0
    if best[1] is None:  # every candidate gave a non-finite loss: keep the layer as is
        return torch.ones(n_ch, dtype=torch.float32, device=x_sum.device)
    return best[1]


@torch.no_grad()
def fold_scales(layer, pair: ScalingPair, s: torch.Tensor, norm: str) -> None:
    """prev's output channels / s, linears' input channels * s: exactly output-preserving."""
    s = s.float()
    prev = get_submodule(layer, pair.prev)

    def div(p: torch.Tensor, scale: torch.Tensor) -> None:
        p.copy_((p.float() / scale).to(p.dtype))

    if isinstance(prev, nn.Linear):
        div(prev.weight, s.view(-1, 1))
        if prev.bias is not None:
            div(prev.bias, s)
    elif norm == "rms_one_plus":  # y = norm(x) * (1 + w): the effective weight is 1 + w
        prev.weight.copy_(((1 + prev.weight.float()) / s - 1).to(prev.weight.dtype))
    elif norm in ("rms", "layernorm"):
        div(prev.weight, s)
        if getattr(prev, "bias", None) is not None:
            div(prev.bias, s)
    else:
        raise ValueError(f"unknown norm kind {norm!r}")
    for name in pair.linears:
        w = get_submodule(layer, name).weight
        w.copy_((w.float() * s.view(1, -1)).to(w.dtype))


# ----------------------------------------------------------------------------------------------
# Clip search


def _token_sample(xs: list[torch.Tensor], n: int) -> torch.Tensor:
    """Every k-th token over all chunks (k = total // n), at most n of them -> [T, C]."""
    n_ch = xs[0].shape[-1]
    total = sum(x.numel() // n_ch for x in xs)
    step = max(1, total // n)
    picked, offset = [], 0
    for x in xs:
        xf = x.reshape(-1, n_ch)
        start = (-offset) % step
        picked.append(xf[start::step])
        offset += xf.shape[0]
    return torch.cat(picked)[:n]


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, cfg: QuantConfig, max_elems: int = 1 << 26) -> torch.Tensor:
    """Per (output channel, group) clip value max|w| * (1 - i/grid) minimising |x (Q(clip(w)) - w)^T|^2.

    w [O, I], x [T, I] -> max_val [O, I/G]. The error per group is a batched matmul over groups.
    """
    n_out, n_in = w.shape
    g = cfg.group_size
    n_groups = n_in // g
    n_tok = x.shape[0]
    xg = x.reshape(n_tok, n_groups, g).transpose(0, 1).to(w.dtype)  # [G, T, g]
    batch = max(1, min(n_out, max_elems // max(1, n_groups * n_tok)))
    result = []
    for o0 in range(0, n_out, batch):
        wb = w[o0:o0 + batch].reshape(-1, n_groups, g)  # [b, G, g]
        org_max = wb.abs().amax(dim=-1, keepdim=True)
        best_err = torch.full(org_max.shape[:2], float("inf"), device=w.device)
        best_max = org_max.clone()
        for i in range(int(cfg.clip_max_shrink * cfg.clip_grid)):
            max_val = org_max * (1 - i / cfg.clip_grid)
            cur = torch.clamp(wb, -max_val, max_val)
            q = pseudo_quantize(cur.reshape(-1, n_in), cfg.w_bit, g, cfg.zero_point)[0].reshape(wb.shape)
            dw = (q - wb).permute(1, 2, 0)  # [G, g, b]
            err = torch.bmm(xg, dw).float().pow(2).mean(dim=1).t()  # [b, G]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better.unsqueeze(-1), max_val, best_max)
        result.append(best_max.squeeze(-1))
    return torch.cat(result)


@torch.no_grad()
def apply_clip(w: torch.Tensor, max_val: torch.Tensor, group_size: int) -> None:
    n_out, n_in = w.shape
    m = max_val.unsqueeze(-1).to(w.dtype)
    wg = w.view(n_out, n_in // group_size, group_size)
    wg.copy_(torch.clamp(wg, -m, m))


# ----------------------------------------------------------------------------------------------
# The driver


def _check(model, adapter: Adapter, calib_ids, cfg: QuantConfig) -> None:
    if cfg.method not in ("awq", "rtn"):
        raise UserError(f"--method: expected awq or rtn, got {cfg.method!r}")
    if not 2 <= cfg.w_bit <= 8:
        raise UserError(f"--w-bit: expected 2..8, got {cfg.w_bit}")
    if cfg.next_inputs not in ("quant", "fp"):
        raise UserError(f"next_inputs: expected quant or fp, got {cfg.next_inputs!r}")
    for i, layer in enumerate(get_layers(model, adapter)):
        for rel in adapter.linear_names():
            lin = get_submodule(layer, rel)
            if not isinstance(lin, nn.Linear):
                raise UserError(f"{adapter.layers_path}.{i}.{rel} is a {type(lin).__name__}, expected a Linear layer")
            if cfg.group_size <= 0 or lin.in_features % cfg.group_size:
                raise UserError(f"--group-size {cfg.group_size} does not divide the {lin.in_features} input "
                                f"channels of {adapter.layers_path}.{i}.{rel}")
    if cfg.method == "awq":
        if calib_ids is None or calib_ids.dim() != 2 or calib_ids.numel() == 0:
            raise UserError("AWQ needs calibration token ids [n_samples, seqlen] (or use --method rtn)")


def _skipped(adapter: Adapter, full_name: str) -> bool:
    return any(part in adapter.not_convert for part in full_name.split("."))


@torch.no_grad()
def quantize_model(model, adapter: Adapter, calib_ids: torch.LongTensor | None, cfg: QuantConfig,
                   device: str = "cpu", progress: bool = True,
                   on_layer: Callable[[int], None] | None = None) -> dict[str, QuantizedLinear]:
    """Quantize every decoder layer's linears in place (fake-quant weights) and return the integers.

    `on_layer(i)` is called after layer i is done (benchmarks time layers with it).
    """
    from tqdm.auto import tqdm

    _check(model, adapter, calib_ids, cfg)
    device = torch.device(device)
    layers = get_layers(model, adapter)
    model_device = next(model.parameters()).device

    hidden, calls = None, None
    if cfg.method == "awq":
        seqlen = calib_ids.shape[1]
        per_chunk = max(1, cfg.chunk_tokens // seqlen)
        chunks = list(calib_ids.to(model_device).split(per_chunk))
        hidden, calls = _capture_inputs(model, layers, chunks)

    results: dict[str, QuantizedLinear] = {}
    bar = tqdm(range(len(layers)), desc=f"{cfg.method.upper()} w{cfg.w_bit} g{cfg.group_size}", disable=not progress)
    for i in bar:
        layer = layers[i]
        orig_dtype = next(layer.parameters()).dtype
        dtype = _compute_dtype(device, orig_dtype)
        layer.to(device=device, dtype=dtype)
        names = {rel: f"{adapter.layers_path}.{i}.{rel}" for rel in adapter.linear_names()}
        names = {rel: full for rel, full in names.items() if not _skipped(adapter, full)}
        try:
            if cfg.method == "awq":
                hidden = _awq_layer(layer, adapter, names, hidden, calls, i, cfg, device, dtype)
            for rel, full in names.items():
                lin = get_submodule(layer, rel)
                results[full], lin.weight.data = quantize_weight(lin.weight.data, cfg.w_bit, cfg.group_size,
                                                                 cfg.zero_point)
            if cfg.method == "awq" and cfg.next_inputs == "quant":
                hidden = [_run_layer(layer, h, calls[c][i], device, dtype) for c, h in enumerate(hidden)]
        finally:
            layer.to(device=model_device, dtype=orig_dtype)
        if on_layer is not None:
            on_layer(i)
    return results


def _compute_dtype(device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    # CPU matmuls in fp16 are slow and imprecise; GPUs compute in the model's own dtype.
    return torch.float32 if device.type == "cpu" else model_dtype


def _run_layer(layer, h, call, device, dtype):
    args, kwargs = _to(call, device, dtype)
    return _first(layer(h, *args, **kwargs))


def _awq_layer(layer, adapter: Adapter, names: dict[str, str], hidden, calls, i: int, cfg: QuantConfig,
               device, dtype):
    """Scale search + fold, then clip, for layer i. Returns the next layer's inputs when they are
    the unquantized outputs (next_inputs == "fp"), else the current inputs (rerun after quantization)."""
    pairs = [p for p in adapter.pairs if pair_applies(layer, p) and all(n in names for n in p.linears)]
    # Linears sharing an input (q/k/v, gate/up) share one recording; `owner` names the recorded one.
    owner = {}
    for p in pairs:
        for n in p.linears:
            owner.setdefault(n, p.linears[0])
    for n in names:
        owner.setdefault(n, n)
    feats: dict[str, list[torch.Tensor]] = {o: [] for o in set(owner.values())}
    hooks = [get_submodule(layer, o).register_forward_hook(
        lambda m, inp, out, o=o: feats[o].append(inp[0].detach())) for o in feats]
    kws, outs = [], []
    try:
        for c, h in enumerate(hidden):
            h = h.to(device=device, dtype=dtype)
            args, kwargs = _to(calls[c][i], device, dtype)
            if args:
                raise RuntimeError("decoder layers called with extra positional arguments are not supported")
            kws.append(kwargs)
            hidden[c] = h
            out = _first(layer(h, **kwargs))
            if cfg.next_inputs == "fp":
                outs.append(out)
    finally:
        for hk in hooks:
            hk.remove()

    for p in pairs:
        xs = feats[owner[p.linears[0]]]
        s = _search_scale(layer, p, xs, kws, cfg)
        fold_scales(layer, p, s, adapter.norm)
        for x in xs:  # prev's output, i.e. the recorded input, is now x / s
            x.div_(s.to(x.dtype))

    if cfg.clip:
        for rel in names:
            if rel in adapter.no_clip:
                continue
            lin = get_submodule(layer, rel)
            x = _token_sample(feats[owner[rel]], cfg.clip_tokens)
            apply_clip(lin.weight.data, search_clip(lin.weight.data, x, cfg), cfg.group_size)
    del feats
    return outs if cfg.next_inputs == "fp" else hidden
