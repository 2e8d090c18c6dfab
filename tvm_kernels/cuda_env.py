"""Build CUDA kernels on a machine without a GPU (CI, the x86 build host).

TVM's CUDA runtime library (libtvm_runtime_cuda.so) links against the driver, libcuda.so.1; without a
driver TVM silently skips loading it and then cannot compile CUDA at all. We build a stand-in
libcuda.so.1 whose functions all fail (nothing here ever launches a kernel) and load it with
RTLD_GLOBAL *before* tvm loads its CUDA runtime: the dynamic loader then matches the soname that is
already loaded instead of searching the disk.

Usage, wherever CUDA is built:

    from tvm_kernels.cuda_env import prepare_cuda_build
    prepare_cuda_build()        # before the first `import tvm` in the process (preferred)
    import tvm

Called after `import tvm` it still works: it then loads TVM's CUDA runtime itself, which tvm skipped.
On a machine with a real driver the stub is not needed and not loaded.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gzip
import hashlib
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

from tvm_kernels.errors import UserError

REPO = Path(__file__).resolve().parent.parent
STUB_DIR = REPO / ".cache" / "cuda_stub"

# The driver symbols libtvm_runtime_cuda.so imports (nm -D --undefined-only ... | grep ' cu[A-Z]').
# Read from the library when it is present, so a newer wheel's extra imports are covered too.
_FALLBACK_DRIVER_SYMBOLS = (
    "cuDeviceGetName", "cuFuncSetAttribute", "cuGetErrorName", "cuGetErrorString", "cuLaunchKernelEx",
    "cuModuleGetFunction", "cuModuleLoadData", "cuModuleUnload", "cuTensorMapEncodeTiled",
)
FATBIN_MAGIC = bytes.fromhex("50ed55ba")
# TVM arch numbers built as their arch-specific variant (sm_90 -> sm_90a); DeviceTarget.arch names the variant
ARCH_SPECIFIC = {"90"}
_state: dict = {}


def _tvm_lib_dir() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("tvm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "lib"


def _driver_symbols(runtime_cuda: Path | None) -> tuple[str, ...]:
    nm = shutil.which("nm")
    if runtime_cuda is None or not runtime_cuda.is_file() or nm is None:
        return _FALLBACK_DRIVER_SYMBOLS
    out = subprocess.run([nm, "-D", "--undefined-only", str(runtime_cuda)], capture_output=True, text=True)
    syms = sorted({m.group(1) for m in re.finditer(r"\bU (cu[A-Z]\w*)", out.stdout)})
    return tuple(syms) or _FALLBACK_DRIVER_SYMBOLS


def _build_stub(symbols: tuple[str, ...]) -> Path:
    key = hashlib.sha1(",".join(symbols).encode()).hexdigest()[:10]
    lib = STUB_DIR / key / "libcuda.so.1"
    if lib.is_file():
        return lib
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise UserError("building CUDA kernels without a GPU needs gcc (for the stub libcuda.so.1); none on PATH")
    # 999 = CUDA_ERROR_UNKNOWN: any accidental call fails loudly instead of pretending to run.
    src = "".join(f"int {s}(void) {{ return 999; }}\n" for s in symbols)
    tmp = STUB_DIR / f"{key}.tmp{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "stub.c").write_text(src)
    proc = subprocess.run(
        [gcc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(tmp / "libcuda.so.1"), str(tmp / "stub.c")],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise UserError(f"gcc failed to build the stub libcuda.so.1: {proc.stderr.strip().splitlines()[-1:]}")
    try:
        tmp.rename(lib.parent)
    except OSError:  # another process won the race; use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return lib


def _real_driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
        return True
    except OSError:
        return False


def prepare_cuda_build(embed_ptx: bool = False) -> None:
    """Make `tvm.compile` for CUDA targets work here. Call before `import tvm` (after works too). Idempotent.

    embed_ptx: also embed PTX for the target's arch next to the cubin (compute_XX), so a newer GPU can
    JIT-compile the exact same kernels (how the sm_87 Orin build is checked on the H100).
    """
    if shutil.which("nvcc") is None:
        raise UserError("building CUDA kernels needs nvcc on PATH (CUDA toolkit); none found")
    os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"
    if not _state.get("loaded"):
        import sys

        lib_dir = _tvm_lib_dir()
        if lib_dir is None:
            raise UserError("building CUDA kernels needs the apache-tvm package; it is not installed")
        if not _real_driver_present():
            stub = _build_stub(_driver_symbols(lib_dir / "libtvm_runtime_cuda.so"))
            ctypes.CDLL(str(stub), mode=ctypes.RTLD_GLOBAL)
            _state["stub"] = stub
        if "tvm" in sys.modules:
            # tvm was imported first and silently skipped its CUDA runtime (no libcuda then): load it now;
            # its static initializers register the CUDA module loader the codegen needs.
            from tvm.base import _LOADED_LIBS

            if "tvm_runtime_cuda" not in _LOADED_LIBS:
                _LOADED_LIBS["tvm_runtime_cuda"] = ctypes.CDLL(
                    str(lib_dir / "libtvm_runtime_cuda.so"), mode=ctypes.RTLD_GLOBAL
                )
        _state["loaded"] = True
    set_embed_ptx(embed_ptx)


def set_embed_ptx(flag: bool) -> None:
    """Switch PTX embedding for later CUDA builds in this process (see prepare_cuda_build)."""
    _state["embed_ptx"] = bool(flag)
    if _state.get("callback_installed"):
        return
    import tvm  # noqa: F401  (registers the default callback we override)
    import tvm_ffi
    from tvm.support import nvcc

    def _compile(code):
        target = tvm.target.Target.current(allow_none=True)
        sm = str(getattr(target, "arch", "")).removeprefix("sm_")
        if not sm:
            raise UserError("CUDA builds need a target with an explicit arch (sm_XX)")
        # Hopper compiles arch-specific (sm_90a: wgmma) while TVM's Target keeps the plain name its schedule
        # rules parse (dlight reads "sm_90a" as no tensor cores at all). Every sm_90 GPU runs sm_90a cubins.
        code_sm = sm + "a" if sm in ARCH_SPECIFIC else sm
        arch = ["-gencode", f"arch=compute_{code_sm},code=sm_{code_sm}"]
        if _state.get("embed_ptx"):
            arch += ["-gencode", f"arch=compute_{code_sm},code=compute_{code_sm}"]
        return nvcc.compile_cuda(code, target_format="fatbin", arch=arch, compiler="nvcc")

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", _compile, override=True)
    _state["callback_installed"] = True


def fatbin_entries(data: bytes) -> list[tuple[str, int]]:
    """[(kind, sm)] of every image in every fatbin inside `data`; kind is "cubin" or "ptx".

    nvcc compresses the images, so searching for strings like "compute_87" finds nothing: read the
    fatbin container headers instead (u32 magic, u16 version, u16 header size, u64 payload size; each
    image: u16 kind (1 PTX, 2 ELF), u16, u32 header size, u64 size, ..., u32 arch at byte 28).
    """
    entries, pos = [], 0
    while (i := data.find(FATBIN_MAGIC, pos)) >= 0:
        if i + 16 > len(data):
            break
        _, _, hsz, fsz = struct.unpack_from("<IHHQ", data, i)
        p, end = i + hsz, min(i + hsz + fsz, len(data))
        while p + 32 <= end:
            kind, _, ehs, size = struct.unpack_from("<HHIQ", data, p)
            arch = struct.unpack_from("<I", data, p + 28)[0]
            if ehs == 0:
                break
            entries.append(({1: "ptx", 2: "cubin"}.get(kind, f"kind{kind}"), arch))
            p += ehs + size
        pos = max(end, i + 4)
    return entries


def check_cubin(path_or_bytes, arch: str, ptx: bool = False) -> list[tuple[str, int]]:
    """Raise UserError unless a built library holds a CUDA fatbin with a cubin for `arch` (e.g. "sm_90")
    and no CUDA source (a library embedding source would need NVRTC and a driver on the device).
    ptx=True also requires PTX for that arch (for JIT on newer GPUs). Returns the fatbin images."""
    if isinstance(path_or_bytes, (bytes, bytearray)):
        data, name = bytes(path_or_bytes), "library"
    else:
        p = Path(path_or_bytes)
        if not p.is_file():
            raise UserError(f"{p}: no such built library")
        data, name = p.read_bytes(), str(p)
    if data[:2] == b"\x1f\x8b":  # export_library("x.tar") gzips the object files (cross builds without a linker)
        data = gzip.decompress(data)
    m = re.fullmatch(r"sm_(\d+)a?", arch)
    if not m:
        raise UserError(f"check_cubin: arch must look like sm_90, got {arch!r}")
    sm = int(m.group(1))
    if b"__global__" in data:
        raise UserError(f"{name}: embeds CUDA source (__global__), not compiled cubins")
    entries = fatbin_entries(data)
    if not entries:
        raise UserError(f"{name}: holds no CUDA fatbin (magic 50 ed 55 ba)")
    if ("cubin", sm) not in entries:
        raise UserError(f"{name}: its fatbin holds no {arch} cubin (has {entries})")
    if ptx and ("ptx", sm) not in entries:
        raise UserError(f"{name}: its fatbin holds no compute_{sm} PTX (has {entries})")
    return entries
