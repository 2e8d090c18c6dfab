"""Read safetensors files with numpy alone (the runtime may not depend on torch or the safetensors package).

The format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}
(offsets relative to the end of the header), then the raw little-endian tensor bytes.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from runtime.errors import UserError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
# manifest dtype strings (TVM names) -> numpy
NP_DTYPES = {
    "float64": np.float64, "float32": np.float32, "float16": np.float16, "int64": np.int64,
    "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint64": np.uint64, "uint32": np.uint32,
    "uint16": np.uint16, "uint8": np.uint8, "bool": np.bool_,
}


def read_header(path: Path) -> tuple[dict, int]:
    """Return (header without __metadata__, offset of the data section)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            size = path.stat().st_size
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def load_safetensors(path: Path, mmap: bool = True) -> dict[str, np.ndarray]:
    """All tensors of a file as numpy arrays (memory-mapped, read-only, unless mmap=False)."""
    path = Path(path)
    header, start = read_header(path)
    size = path.stat().st_size
    data = np.memmap(path, dtype=np.uint8, mode="r") if mmap else np.fromfile(path, dtype=np.uint8)
    out = {}
    for name, info in header.items():
        try:
            dtype = np.dtype(_DTYPES[info["dtype"]])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}: tensor {name!r} has a bad header entry ({e})") from None
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != nbytes or start + end > size or begin < 0:
            raise UserError(f"{path}: tensor {name!r} runs past the end of the file or has the wrong byte count")
        out[name] = data[start + begin:start + end].view(dtype).reshape(shape)
    return out


class ParamReader:
    """The artifact's weights by manifest entry. Each entry names its file: `params.safetensors` when
    the weights fit one shard (and in every artifact older than sharding), else the shards
    `params-0000i-of-0000N.safetensors`. A file is opened (memory-mapped) once, when first needed."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._files: dict[str, tuple[Path, dict[str, np.ndarray]]] = {}

    def get(self, param: dict) -> np.ndarray:
        name, shape, dtype = param["name"], tuple(int(d) for d in param["shape"]), param["dtype"]
        fname = param.get("file", "params.safetensors")
        if fname is None:
            raise UserError(f"{self.folder}: exported without weights (param {name!r} has no file); "
                            f"pass --synthesize-weights for a speed run")
        if fname not in self._files:
            path = self.folder / fname
            if not path.is_file():
                raise UserError(f"{path}: missing (weights-less artifact? use synthesize_weights / --synthesize-weights for speed runs)")
            self._files[fname] = (path, load_safetensors(path))
        path, tensors = self._files[fname]
        if name not in tensors:
            raise UserError(f"{path}: has no tensor {name!r} (listed in the manifest)")
        a = tensors[name]
        if a.shape != shape or a.dtype != np.dtype(NP_DTYPES[dtype]):
            raise UserError(f"{path}: tensor {name!r} is {a.dtype}{list(a.shape)}, the manifest says {dtype}{list(shape)}")
        return a
