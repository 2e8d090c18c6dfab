"""Read a checkpoint folder (FP16 Hugging Face or AutoAWQ GEMM) and hand out weights in the kernels' layout.

No torch: safetensors files are read through their header and a numpy memmap, so bf16 tensors (which
numpy cannot name) are widened by bit shifting. Memory stays bounded: a tensor is read only when the
exporter asks for it.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.errors import UserError
from tvm_kernels.layout import GROUP_SIZES

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U32": np.uint32,
    "BOOL": np.bool_,
}


class SafetensorsFolder:
    """Every tensor of the *.safetensors files in a folder, by name."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise UserError(f"{self.folder}: no *.safetensors weights found")
        self._index: dict[str, tuple[Path, dict[str, Any], int]] = {}
        for f in files:
            try:
                with open(f, "rb") as fh:
                    (n,) = struct.unpack("<Q", fh.read(8))
                    header = json.loads(fh.read(n))
            except (OSError, ValueError, struct.error) as e:
                raise UserError(f"{f}: not a readable safetensors file ({e})") from None
            header.pop("__metadata__", None)
            for name, info in header.items():
                self._index[name] = (f, info, 8 + n)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def names(self) -> list[str]:
        return list(self._index)

    def get(self, name: str) -> np.ndarray:
        """The tensor as numpy; bf16 comes back as float32 (exact)."""
        if name not in self._index:
            raise UserError(f"{self.folder}: checkpoint lacks tensor {name!r}")
        path, info, base = self._index[name]
        dtype = info["dtype"]
        if dtype not in _DTYPES:
            raise UserError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        arr = np.memmap(path, dtype=np.uint8, mode="r", offset=base + start, shape=(end - start,))
        out = np.array(arr.view(_DTYPES[dtype]).reshape(shape))
        if dtype == "BF16":
            out = (out.astype(np.uint32) << 16).view(np.float32)
        return out


@dataclass(frozen=True)
class QuantConfig:
    bits: int
    group_size: int
    zero_point: bool
    modules_to_not_convert: tuple[str, ...] = ()

    def as_manifest(self) -> dict[str, Any]:
        return {
            "method": "awq", "bits": self.bits, "group_size": self.group_size, "zero_point": self.zero_point,
            "layout": "w4a16-kernel: weight uint32 [N, K/8] (nibble j of word w = q[n, 8w+j]), "
                      "scales/zeros float16 [N, K/G]; fused qkv_proj = rows of q, k, v; fused gate_up_proj = "
                      "rows interleaved (gate_0, up_0, gate_1, up_1, ...)",
        }


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UserError(f"{folder}: no config.json (expected a Hugging Face or AutoAWQ checkpoint folder)")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None


def quant_config(config: dict[str, Any], where: Path) -> QuantConfig | None:
    """None for an FP16 checkpoint; else the AutoAWQ GEMM settings, checked against what the kernels run."""
    qc = config.get("quantization_config")
    if not qc:
        return None
    method = str(qc.get("quant_method", "")).lower()
    version = str(qc.get("version", "gemm")).lower()
    if method != "awq" or version != "gemm":
        raise UserError(f"{where}/config.json: quantization {method!r} version {version!r}; "
                        "export reads AWQ GEMM checkpoints (quant_method 'awq', version 'gemm')")
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    group = int(qc.get("group_size", qc.get("q_group_size", 128)))
    if bits not in (3, 4):
        raise UserError(f"{where}/config.json: {bits}-bit weights; the kernels run 4-bit (and INT3 in its 4-bit container)")
    if group not in GROUP_SIZES:
        raise UserError(f"{where}/config.json: group size {group}; the kernels support 32, 64 and 128")
    return QuantConfig(bits, group, bool(qc.get("zero_point", True)),
                       tuple(qc.get("modules_to_not_convert") or ()))


class LinearSource:
    """Weights of the linears of one checkpoint, returned in the layout the compiled module takes."""

    def __init__(self, tensors: SafetensorsFolder, quant: QuantConfig | None):
        self.tensors = tensors
        self.quant = quant

    def is_quantized(self, prefix: str) -> bool:
        return self.quant is not None and f"{prefix}.qweight" in self.tensors

    def fp16(self, prefix: str) -> np.ndarray:
        """FP16 W [N, K] of a linear stored as `prefix.weight`."""
        return self.tensors.get(f"{prefix}.weight").astype(np.float16)

    def kernel_layout(self, prefix: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(weight uint32 [N, K/8], scales f16 [N, K/G], zeros f16 [N, K/G]) of an AWQ GEMM linear."""
        from tvm_kernels.layout import repack_awq

        t = self.tensors
        qweight, qzeros, scales = t.get(f"{prefix}.qweight"), t.get(f"{prefix}.qzeros"), t.get(f"{prefix}.scales")
        G = self.quant.group_size
        K = qweight.shape[0]
        if qweight.dtype != np.int32 or qzeros.dtype != np.int32 or K % G or scales.shape != (K // G, qweight.shape[1] * 8):
            raise UserError(f"{t.folder}: {prefix}: AWQ tensors qweight {qweight.shape} {qweight.dtype}, "
                            f"qzeros {qzeros.shape}, scales {scales.shape} do not fit group size {G}")
        w, s, z = repack_awq(qweight, qzeros, scales.astype(np.float16), G)
        return np.ascontiguousarray(w, dtype=np.uint32), np.ascontiguousarray(s, np.float16), np.ascontiguousarray(z, np.float16)

    def bias(self, prefix: str) -> np.ndarray | None:
        name = f"{prefix}.bias"
        return self.tensors.get(name).astype(np.float16) if name in self.tensors else None


def tokenizer_files(folder: Path) -> tuple[list[Path], str | None]:
    """The tokenizer files to copy, and the chat template (tokenizer_config.json or chat_template.jinja)."""
    folder = Path(folder)
    tok = folder / "tokenizer.json"
    if not tok.is_file():
        raise UserError(f"{folder}: no tokenizer.json (the runtime needs the fast tokenizer file)")
    files = [tok]
    template = None
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        files.append(cfg)
        try:
            template = json.loads(cfg.read_text()).get("chat_template")
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{cfg}: unreadable ({e})") from None
        if isinstance(template, list):  # named templates: keep the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        files.append(jinja)
        template = template or jinja.read_text()
    for extra in ("generation_config.json", "special_tokens_map.json"):
        if (folder / extra).is_file():
            files.append(folder / extra)
    return files, template
