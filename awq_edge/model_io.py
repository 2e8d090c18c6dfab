"""Loading models offline: a Hugging Face folder (config.json + safetensors) or a GGUF file.

Every way an input can be wrong (missing folder, no config.json, broken JSON, an architecture that
transformers or our adapters do not know, a truncated safetensors file) becomes one UserError naming
the file, raised before any weights are read where that is possible.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from awq_edge.errors import UserError

# Loading must never reach the network: a typo in a path would otherwise turn into a hub lookup.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def is_gguf(path: Path) -> bool:
    return Path(path).suffix.lower() == ".gguf"


def _gguf_cache_dir(gguf: Path) -> Path:
    from awq_edge.reference import CACHE_DIR

    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return CACHE_DIR / "gguf" / f"{gguf.stem}-{key}"


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """The Hugging Face folder for `path`; a GGUF file is dequantized once into a cached FP16 folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such model folder or GGUF file")
    if path.is_file():
        if not is_gguf(path):
            raise UserError(f"{path}: expected a Hugging Face model folder (config.json + *.safetensors) or a .gguf file")
        folder = _gguf_cache_dir(path)
        if not (folder / "config.json").is_file():
            from awq_edge.reference import gguf_to_fp16_folder

            gguf_to_fp16_folder(path, folder)
        return folder
    return path


def read_config_dict(folder: Path) -> dict[str, Any]:
    cfg_path = Path(folder) / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{cfg_path}: missing (a model folder needs config.json and *.safetensors)")
    try:
        data = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise UserError(f"{cfg_path}: expected a JSON object with a \"model_type\" field")
    return data


def load_config(folder: Path):
    """transformers config of a folder; an unknown model_type is a UserError naming config.json."""
    from transformers import AutoConfig

    data = read_config_dict(folder)
    try:
        return AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise UserError(
            f"{Path(folder) / 'config.json'}: unknown or unreadable architecture "
            f"model_type={data.get('model_type')!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def safetensors_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted({folder / f for f in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder}: no *.safetensors weights (only safetensors checkpoints are read)")
    return files


def check_safetensors(folder: Path) -> list[Path]:
    """Open every shard's header: a truncated or corrupt file fails here, before any real work.

    safetensors checks that the header's offsets cover exactly the file's length, so a cut-off
    download is caught without reading the tensors.
    """
    from safetensors import safe_open

    files = safetensors_files(folder)
    for f in files:
        if not f.is_file():
            raise UserError(f"{f}: listed in the safetensors index but missing")
        try:
            with safe_open(str(f), framework="pt") as h:
                h.keys()
        except Exception as e:  # SafetensorError, OSError
            raise UserError(f"{f}: truncated or corrupt safetensors file ({e})") from None
    return files


def model_class(config):
    """The class named in config.architectures (e.g. Qwen2_5_VLForConditionalGeneration, which
    AutoModelForCausalLM does not map), else AutoModelForCausalLM."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None and hasattr(cls, "from_pretrained") and ("CausalLM" in name or "ConditionalGeneration" in name):
            return cls
    return transformers.AutoModelForCausalLM


def meta_model(config):
    """The model's module tree with no memory behind it: shapes for validating flags up front."""
    import torch

    cls = model_class(config)
    with torch.device("meta"):
        if cls.__name__.startswith("Auto"):
            return cls.from_config(config)
        return cls._from_config(config)


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises many types for missing/bad tokenizer files
        raise UserError(f"{folder}: no readable tokenizer (tokenizer.json / tokenizer_config.json): {type(e).__name__}: {e}") from None


def load_model(path: str | os.PathLike, dtype=None, device: str = "cpu", tokenizer=None):
    """(model, tokenizer, config) from a Hugging Face folder or a GGUF file, in eval mode on `device`.
    Pass an already loaded `tokenizer` to skip reading it again."""
    import torch

    dtype = dtype or torch.float16
    folder = resolve_model_dir(path)
    config = load_config(folder)
    check_safetensors(folder)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(folder)
    try:
        model = model_class(config).from_pretrained(str(folder), config=config, dtype=dtype, local_files_only=True)
    except Exception as e:
        raise UserError(f"{folder}: could not load the weights ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    model.eval().to(device)
    return model, tokenizer, config


def is_awq_checkpoint(folder: Path) -> bool:
    qc = read_config_dict(folder).get("quantization_config") or {}
    return isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "awq"


def load_any(path: str | os.PathLike, dtype=None, device: str = "cpu"):
    """An FP16 model or an AWQ checkpoint (dequantized), whichever `path` holds: (model, tokenizer, config)."""
    folder = resolve_model_dir(path)
    if is_awq_checkpoint(folder):
        from awq_edge.checkpoint import load_awq_model

        model = load_awq_model(folder, device=device, dtype=dtype)
        return model, load_tokenizer(folder), model.config
    return load_model(folder, dtype=dtype, device=device)
