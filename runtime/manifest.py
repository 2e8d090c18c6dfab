"""The artifact manifest: one dataclass that export writes and the runtime reads.

An artifact folder holds `manifest.json`, the compiled library, the weights (safetensors, in the
kernels' layout, in the order the compiled functions take them) and the tokenizer files. Every file
is listed with its sha256 so that a copy to a board can be checked before it runs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import UserError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Manifest:
    # model: family, architecture and the config fields the runtime needs (hidden_size,
    # num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, vocab_size, rope_theta,
    # rope_scaling, rms_norm_eps, tie_word_embeddings, ...)
    model: dict[str, Any]
    # target: {"name": "cuda-sm90", "device": "cuda" | "cpu", "tvm_target": ..., "host_triple": ...}
    target: dict[str, Any]
    library: str  # the compiled module, relative to the folder
    # params in the order the functions take them: [{"name", "shape", "dtype", "file"}]; "file" is
    # params.safetensors when the weights fit one shard (and in artifacts older than sharding), else
    # one of the shards params-0000i-of-0000N.safetensors; null in a weights-less artifact
    params: list[dict[str, Any]]
    # name -> {"inputs": [...], "outputs": [...], "doc": ...}
    functions: dict[str, dict[str, Any]]
    # page_size, max_total_seq_len (the context length), prefill_chunk_size, max_batch_size, sliding_window
    kv_cache: dict[str, Any]
    # files (tokenizer.json, ...), chat_template, bos_token_id, eos_token_ids
    tokenizer: dict[str, Any]
    # None for the FP16 baseline; else {"method": "awq", "bits", "group_size", "zero_point", "layout"}
    quantization: dict[str, Any] | None = None
    tvm_version: str = ""
    # {"capturable": bool, "mode": "decode-step" (runtime/cuda_graph.py) | "regions" (TVM's graphs inside
    # the library) | None, "why": str}; artifacts before modes have no "mode" and run as "regions"
    cuda_graph: dict[str, Any] = field(default_factory=dict)
    created_by: dict[str, Any] = field(default_factory=dict)  # awq-edge version, command, time
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    format_version: int = FORMAT_VERSION

    @property
    def context_length(self) -> int:
        return int(self.kv_cache["max_total_seq_len"])

    @property
    def param_files(self) -> list[str]:
        """The weight files, in the order the params first use them."""
        return list(dict.fromkeys(p["file"] for p in self.params if p.get("file")))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False)

    def write(self, folder: Path) -> Path:
        """Hash every other file in `folder`, then write the manifest beside them."""
        folder = Path(folder)
        self.files = {
            str(p.relative_to(folder)): sha256_file(p)
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST_NAME
        }
        path = folder / MANIFEST_NAME
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, folder: Path, verify: bool = True) -> "Manifest":
        folder = Path(folder)
        path = folder / MANIFEST_NAME
        if not path.is_file():
            raise UserError(f"{folder}: not an awq-edge artifact (no {MANIFEST_NAME})")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: unreadable manifest ({e})") from None
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise UserError(f"{path}: artifact format {version}, this runtime reads format {FORMAT_VERSION}")
        known = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and f.name not in data]
        if missing:
            raise UserError(f"{path}: manifest lacks {', '.join(missing)}")
        manifest = cls(**{k: v for k, v in data.items() if k in known})
        if verify:
            manifest.verify(folder)
        return manifest

    def verify(self, folder: Path) -> None:
        """Raise naming the first file that is missing or whose hash differs."""
        folder = Path(folder)
        for rel, digest in self.files.items():
            p = folder / rel
            if not p.is_file():
                raise UserError(f"{p}: listed in the manifest but missing")
            if sha256_file(p) != digest:
                raise UserError(f"{p}: sha256 differs from the manifest (corrupt or modified copy)")
