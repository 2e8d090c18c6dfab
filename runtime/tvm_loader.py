"""Find and load the TVM runtime libraries without importing the `tvm` compiler package.

The board has only `tvm_ffi` (the apache-tvm-ffi wheel) and two shared libraries from the apache-tvm
wheel: libtvm_runtime.so (Relax VM, paged KV cache builtins) and, for CUDA, libtvm_runtime_cuda.so.
They are loaded with RTLD_GLOBAL before the compiled model so that its symbols resolve against them.

Search order for the folder holding them:
1. $AWQ_EDGE_TVM_LIB (a folder)
2. the folder a runtime bundle unpacks beside this package (`runtime/_tvmlib/`)
3. the installed `tvm` package's `lib/` folder, located with importlib.util.find_spec (not imported)
"""
from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import sys
from pathlib import Path

from runtime.errors import UserError

ENV_LIB = "AWQ_EDGE_TVM_LIB"
ENV_CUDART = "AWQ_EDGE_CUDART"
BUNDLE_LIB = Path(__file__).resolve().parent / "_tvmlib"
RUNTIME_LIB = "libtvm_runtime.so"
CUDA_LIB = "libtvm_runtime_cuda.so"
CUDART = "libcudart.so.13"

# device type codes of DLPack
DEVICE_TYPES = {"cpu": 1, "cuda": 2}

_loaded: dict[str, ctypes.CDLL] = {}


def candidate_dirs() -> list[Path]:
    dirs = []
    if os.environ.get(ENV_LIB):
        dirs.append(Path(os.environ[ENV_LIB]))
    dirs.append(BUNDLE_LIB)
    try:
        spec = importlib.util.find_spec("tvm")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            dirs.append(Path(loc) / "lib")
    return dirs


def find_library(name: str) -> Path:
    dirs = candidate_dirs()
    for d in dirs:
        if (d / name).is_file():
            return d / name
    raise UserError(
        f"{name} not found in {', '.join(str(d) for d in dirs)}; set {ENV_LIB} to the folder holding it "
        f"(from `awq-edge bundle-runtime`) or install apache-tvm"
    )


def _find_cudart() -> str:
    """libcudart.so.13: $AWQ_EDGE_CUDART, then NVIDIA's pip wheels (torch brings them), then the system."""
    if os.environ.get(ENV_CUDART):
        return os.environ[ENV_CUDART]
    for base in sys.path:
        hits = sorted(glob.glob(os.path.join(base, "nvidia", "**", CUDART + "*"), recursive=True))
        if hits:
            return hits[0]
    return CUDART  # let the dynamic loader search LD_LIBRARY_PATH / ldconfig


def _dlopen(path: str) -> ctypes.CDLL:
    if path not in _loaded:
        try:
            _loaded[path] = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            raise UserError(f"cannot load {path}: {e}") from None
    return _loaded[path]


def import_tvm_ffi():
    """Import tvm_ffi without letting it pull in torch as a side effect.

    tvm_ffi tries `import torch` at import time (a workaround for a Windows symbol clash); on a board
    that costs seconds and memory for nothing, so when torch is not already loaded, hide it for the
    duration of the import.
    """
    if "tvm_ffi" in sys.modules:
        return sys.modules["tvm_ffi"]
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        import tvm_ffi
    except ImportError as e:
        raise UserError(f"the TVM runtime needs the apache-tvm-ffi package ({e})") from None
    finally:
        if hide and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return tvm_ffi


def physical_cores() -> int:
    """The cores this process may run on, hyper-thread siblings counted once.

    TVM's own default is half the logical CPUs (it assumes two threads per core): one thread on a
    2-vCPU machine whose vCPUs are separate cores, half the speed of llama.cpp's default there."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for c in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(c)))
    return max(1, len(cores))


def cudart() -> ctypes.CDLL:
    """The CUDA runtime library the TVM runtime links (loaded by load_runtime("cuda"))."""
    return _dlopen(_find_cudart())


def load_runtime(device: str = "cpu"):
    """Load libtvm_runtime (and the CUDA parts for device 'cuda'); return the tvm_ffi module.
    The CPU thread pool gets one thread per physical core unless TVM_NUM_THREADS says otherwise (read
    when the pool starts, at the first parallel kernel)."""
    if "TVM_NUM_THREADS" not in os.environ:  # count the cores only when it matters
        os.environ["TVM_NUM_THREADS"] = str(physical_cores())
    tvm_ffi = import_tvm_ffi()
    _dlopen(str(find_library(RUNTIME_LIB)))
    if device == "cuda":
        _dlopen(_find_cudart())
        _dlopen(str(find_library(CUDA_LIB)))
    return tvm_ffi


def load_module(path: Path, device: str = "cpu"):
    tvm_ffi = load_runtime(device)
    try:
        return tvm_ffi.load_module(str(path))
    except Exception as e:  # the FFI raises its own error types; name the file either way
        raise UserError(f"{path}: cannot load the compiled library ({str(e).splitlines()[0] if str(e) else e})") from None


def cuda_available() -> bool:
    """True when a CUDA driver and at least one GPU are present (checked through libcuda, no TVM)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0:
        return False
    return cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def cuda_memory_used() -> int | None:
    """Bytes in use on the current GPU (total - free, via the CUDA runtime that TVM loaded), or None."""
    try:
        rt = ctypes.CDLL(CUDART)
    except OSError:
        return None
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    if rt.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) != 0:
        return None
    return total.value - free.value
