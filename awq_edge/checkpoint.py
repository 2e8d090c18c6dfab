"""AutoAWQ "GEMM" checkpoints: write ours, read ours and third-party ones without autoawq.

Per quantized linear (in K, out N, group G): `qweight` int32 [K, N/8], `qzeros` int32 [K/G, N/8],
`scales` fp16 [K/G, N] (tvm_kernels.awq_layout holds the nibble order); everything else FP16.
The non-quantized tensors go through transformers' own save_pretrained so tensor names, tied
embeddings and the legacy key layout (e.g. Qwen2.5-VL's `model.layers` / `visual`) are exactly what
every loader expects; config.json then gets the fields transformers 4.x and vLLM read.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from awq_edge.errors import UserError

# Tokenizer/processor files copied verbatim from the source model, when present.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
)
# Tokenizer classes written by transformers 5.x that 4.x does not know; they all load tokenizer.json.
_TOKENIZER_CLASS_4X = {"TokenizersBackend": "PreTrainedTokenizerFast"}
# Load-time bookkeeping that 5.x writes into tokenizer_config.json and nobody needs on disk.
_TOKENIZER_DROP_KEYS = ("is_local", "local_files_only")
# Families whose 4.x config was flat (text fields at the top level) before `text_config` existed.
_FLAT_TEXT_CONFIG_TYPES = ("qwen2_vl", "qwen2_5_vl")


# --------------------------------------------------------------------------- output folder
def check_output_dir(out: Path, force: bool, flag: str = "--out") -> None:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: {flag} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out}: {flag} exists and is not empty (pass --force to replace it)")


class AtomicDir:
    """A temporary folder beside `out` that becomes `out` only when the block finishes cleanly."""

    def __init__(self, out: Path, force: bool):
        self.out, self.force = Path(out), force

    def __enter__(self) -> Path:
        check_output_dir(self.out, self.force)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            os.rename(self.out, old / "x")
        os.rename(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


# --------------------------------------------------------------------------- config for 4.x loaders
def _legacy_rope_fields(d: dict[str, Any]) -> None:
    """transformers 5.x writes `rope_parameters`; 4.x (and vLLM pinned to it) reads rope_theta /
    rope_scaling and silently falls back to rope_theta 10000 without them."""
    rp = d.get("rope_parameters")
    if not isinstance(rp, dict):
        return
    if rp and all(isinstance(v, dict) for v in rp.values()):
        # Per-layer-type parameters (Gemma3): 4.x names the sliding layers' base rope_local_base_freq.
        full = rp.get("full_attention") or next(iter(rp.values()))
        if "sliding_attention" in rp and "rope_theta" in rp["sliding_attention"]:
            d.setdefault("rope_local_base_freq", rp["sliding_attention"]["rope_theta"])
        rp = full
    if "rope_theta" in rp:
        d["rope_theta"] = rp["rope_theta"]
    scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
    if set(scaling) - {"rope_type", "type"} or scaling.get("rope_type", "default") != "default":
        d["rope_scaling"] = scaling
    else:
        d.setdefault("rope_scaling", None)


def legacy_compatible_config(d: dict[str, Any], dtype: str = "float16") -> dict[str, Any]:
    d = json.loads(json.dumps(d))
    text = d.get("text_config")
    for sub in (d, text):
        if isinstance(sub, dict):
            _legacy_rope_fields(sub)
            sub["torch_dtype"] = sub["dtype"] = dtype
    if isinstance(text, dict) and d.get("model_type") in _FLAT_TEXT_CONFIG_TYPES:
        # 4.x keeps a nested text_config as a plain dict there and fails on it; 5.x rebuilds
        # text_config from these top-level fields (the layout of the published checkpoints).
        del d["text_config"]
        for k, v in text.items():
            if k not in ("model_type", "architectures"):
                d.setdefault(k, v)
    return d


def _legacy_tokenizer_config(folder: Path, chat_template: str | None) -> None:
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return
    tc = json.loads(path.read_text())
    cls = tc.get("tokenizer_class")
    if cls is None or cls in _TOKENIZER_CLASS_4X:
        tc["tokenizer_class"] = _TOKENIZER_CLASS_4X.get(cls, "PreTrainedTokenizerFast")
    for k in _TOKENIZER_DROP_KEYS:
        tc.pop(k, None)
    # 5.x keeps the template only in chat_template.jinja; older loaders read it from here.
    if chat_template and "chat_template" not in tc:
        tc["chat_template"] = chat_template
    path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")


def _copy_tokenizer(src_dir: Path | None, tokenizer, dst: Path) -> None:
    copied = False
    if src_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(src_dir) / name).is_file():
                shutil.copy2(Path(src_dir) / name, dst / name)
                copied = copied or name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if not copied and tokenizer is not None:
        tokenizer.save_pretrained(str(dst))
    template = None
    if (dst / "chat_template.jinja").is_file():
        template = (dst / "chat_template.jinja").read_text()
    elif tokenizer is not None and isinstance(getattr(tokenizer, "chat_template", None), str):
        template = tokenizer.chat_template
    _legacy_tokenizer_config(dst, template)


# --------------------------------------------------------------------------- write
def awq_tensors(q, group_size: int) -> dict[str, Any]:
    """QuantizedLinear (intweight [out, in], scales/zeros [out, in/G]) -> AutoAWQ GEMM tensors."""
    import numpy as np
    import torch

    from tvm_kernels.awq_layout import pack_awq

    intweight = q.intweight.detach().cpu().numpy().astype(np.uint8)
    zeros = q.zeros.detach().cpu().numpy().astype(np.uint8)
    n, k = intweight.shape
    if n % 8:
        raise UserError(f"out_features {n} is not a multiple of 8: the AWQ GEMM format packs 8 output columns per int32")
    if k % group_size or zeros.shape != (n, k // group_size) or tuple(q.scales.shape) != (n, k // group_size):
        raise UserError(f"quantized linear [{n}, {k}] does not match group size {group_size}")
    return {
        "qweight": torch.from_numpy(pack_awq(np.ascontiguousarray(intweight.T))),
        "qzeros": torch.from_numpy(pack_awq(np.ascontiguousarray(zeros.T))),
        "scales": q.scales.detach().cpu().to(torch.float16).t().contiguous(),
    }


def quantization_config(cfg, adapter) -> dict[str, Any]:
    return {
        "quant_method": "awq",
        "bits": int(cfg.w_bit),
        "group_size": int(cfg.group_size),
        "zero_point": bool(getattr(cfg, "zero_point", True)),
        "version": "gemm",
        "modules_to_not_convert": list(getattr(adapter, "not_convert", ()) or []),
    }


def save_awq_checkpoint(model, qlinears: dict, cfg, adapter, out_dir, src_dir=None, tokenizer=None, force: bool = False) -> Path:
    """Write `model` (FP16 parts, e.g. folded norms) + `qlinears` as an AutoAWQ GEMM checkpoint."""
    import torch

    out = Path(out_dir)
    state = model.state_dict()
    # Cast to fp16 once per storage so that tied tensors stay tied (save_pretrained drops the alias).
    cast: dict[tuple, torch.Tensor] = {}
    sd: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if t.is_floating_point() and t.dtype != torch.float16:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
            if key not in cast:
                cast[key] = t.detach().to(torch.float16)
            t = cast[key]
        sd[name] = t
    for name, q in qlinears.items():
        if f"{name}.weight" not in sd:
            raise UserError(f"quantized linear {name!r} is not a module of the model")
        del sd[f"{name}.weight"]
        for suffix, t in awq_tensors(q, cfg.group_size).items():
            sd[f"{name}.{suffix}"] = t
    with AtomicDir(out, force) as tmp:
        model.save_pretrained(str(tmp), state_dict=sd)
        cfg_path = tmp / "config.json"
        d = legacy_compatible_config(json.loads(cfg_path.read_text()))
        d["quantization_config"] = quantization_config(cfg, adapter)
        cfg_path.write_text(json.dumps(d, indent=2) + "\n")
        _copy_tokenizer(Path(src_dir) if src_dir else None, tokenizer, tmp)
        if src_dir is not None and (Path(src_dir) / "generation_config.json").is_file():
            shutil.copy2(Path(src_dir) / "generation_config.json", tmp / "generation_config.json")
    return out


# --------------------------------------------------------------------------- read
def _awq_settings(folder: Path, d: dict[str, Any]) -> tuple[int, int]:
    qc = d.get("quantization_config")
    where = folder / "config.json"
    if not isinstance(qc, dict) or str(qc.get("quant_method", "")).lower() != "awq":
        raise UserError(f"{where}: not an AWQ checkpoint (quantization_config.quant_method must be \"awq\")")
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise UserError(f"{where}: AWQ version {version!r} is not supported (only \"gemm\")")
    try:
        bits, group = int(qc.get("bits", qc.get("w_bit", 4))), int(qc.get("group_size", qc.get("q_group_size", 128)))
    except (TypeError, ValueError):
        raise UserError(f"{where}: quantization_config bits/group_size must be integers") from None
    if not 2 <= bits <= 4:
        raise UserError(f"{where}: bits={bits}: the GEMM format stores 2..4-bit weights in 4-bit nibbles")
    return bits, group


def dequantized_state_dict(folder: Path, group_size: int, bits: int, dtype) -> dict:
    """Every tensor of the checkpoint, with each (qweight, qzeros, scales) triple replaced by a
    dequantized `weight` [out, in]."""
    import numpy as np
    import torch
    from safetensors import safe_open

    from awq_edge.model_io import check_safetensors
    from tvm_kernels.awq_layout import dequantize_awq, unpack_awq

    sd: dict[str, torch.Tensor] = {}
    owner: dict[str, Path] = {}
    for f in check_safetensors(folder):
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    sd[k] = h.get_tensor(k)
                    owner[k] = f
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"{f}: corrupt safetensors file ({e})") from None
    prefixes = [k[: -len(".qweight")] for k in sd if k.endswith(".qweight")]
    for p in prefixes:
        where = owner[f"{p}.qweight"]
        missing = [s for s in ("qzeros", "scales") if f"{p}.{s}" not in sd]
        if missing:
            raise UserError(f"{where}: {p}.qweight has no {', '.join(p + '.' + s for s in missing)}")
        qw, qz, sc = sd.pop(f"{p}.qweight"), sd.pop(f"{p}.qzeros"), sd.pop(f"{p}.scales")
        if qw.dtype != torch.int32 or qz.dtype != torch.int32 or qw.ndim != 2 or qz.ndim != 2 or sc.ndim != 2:
            raise UserError(f"{where}: {p}: expected int32 qweight/qzeros and 2-D scales, got {qw.dtype} {tuple(qw.shape)}, {qz.dtype} {tuple(qz.shape)}, {tuple(sc.shape)}")
        k_in, n_out = qw.shape[0], qw.shape[1] * 8
        g = group_size if group_size > 0 else k_in
        if k_in % g or tuple(qz.shape) != (k_in // g, n_out // 8) or tuple(sc.shape) != (k_in // g, n_out):
            raise UserError(
                f"{where}: {p}: shapes qweight {tuple(qw.shape)}, qzeros {tuple(qz.shape)}, scales {tuple(sc.shape)} "
                f"do not fit group_size {g}"
            )
        if bits < 4:
            top = max(int(unpack_awq(qw.numpy()).max(initial=0)), int(unpack_awq(qz.numpy()).max(initial=0)))
            if top >= 1 << bits:
                raise UserError(f"{where}: {p}: values up to {top} do not fit bits={bits}")
        w_t = dequantize_awq(qw.numpy(), qz.numpy(), sc.float().numpy(), g)  # [in, out]
        sd[f"{p}.weight"] = torch.from_numpy(np.ascontiguousarray(w_t.T)).to(dtype)
    for k, t in sd.items():
        if t.is_floating_point() and t.dtype != dtype:
            sd[k] = t.to(dtype)
    return sd


def load_awq_model(path, device: str = "cpu", dtype=None):
    """A transformers model with the dequantized weights of an AutoAWQ GEMM checkpoint (ours or a
    third-party one); needs neither autoawq nor a GPU."""
    import torch

    from awq_edge.model_io import load_config, model_class, read_config_dict, resolve_model_dir

    dtype = dtype or torch.float16
    folder = resolve_model_dir(path)
    raw = read_config_dict(folder)
    bits, group = _awq_settings(folder, raw)
    config = load_config(folder)
    # Without this transformers would hand the checkpoint to its AWQ integration (needs gptqmodel).
    for c in [config] + [getattr(config, a) for a in ("text_config",) if getattr(config, a, None) is not None]:
        if hasattr(c, "quantization_config"):
            delattr(c, "quantization_config")
    sd = dequantized_state_dict(folder, group, bits, dtype)
    try:
        model, info = model_class(config).from_pretrained(
            None, config=config, state_dict=sd, dtype=dtype, output_loading_info=True
        )
    except Exception as e:
        raise UserError(f"{folder}: the checkpoint does not fit its config.json ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if info.get("missing_keys") or info.get("mismatched_keys"):
        bad = sorted(info.get("missing_keys") or []) + [str(m[0]) if isinstance(m, tuple) else str(m) for m in info.get("mismatched_keys") or []]
        raise UserError(f"{folder}: the checkpoint lacks or mis-shapes {len(bad)} tensor(s) of the model, e.g. {bad[0]}")
    del sd
    model.eval().to(device)
    return model
