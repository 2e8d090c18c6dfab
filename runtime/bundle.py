"""`awq-edge bundle-runtime`: one archive with everything a board needs to run an artifact.

    awq-edge-runtime/
      runtime/                      this package (pure Python)
      runtime/_tvmlib/              libtvm_runtime.so (+ libtvm_runtime_cuda.so for CUDA targets),
                                    taken from the apache-tvm wheel for the board's platform; the
                                    compiler library (libtvm_compiler.so, ~240 MB) is left out
      wheels/apache_tvm_ffi-*.whl   the FFI for the board's Python (and, with --with-deps, numpy,
                                    tokenizers, jinja2, markupsafe, typing_extensions wheels)
      install.sh, README.txt

The wheels come from `pip download --platform ... --only-binary=:all:` (or from --wheel-dir for an
offline machine), so no build step runs on the board. runtime/tvm_loader.py looks in runtime/_tvmlib first.
"""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import UserError

RUNTIME_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class BundlePlatform:
    arch: str  # wheel platform suffix
    cuda: bool
    python: str  # default Python of the board
    note: str


# manylinux tags are tried newest first; pip matches each exactly
_AARCH64 = ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_24_aarch64",
            "manylinux_2_17_aarch64", "manylinux2014_aarch64")
_X86 = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
        "manylinux_2_17_x86_64", "manylinux2014_x86_64")

PLATFORMS = {
    "jetson-orin": BundlePlatform("aarch64", True, "3.10",
                                  "Jetson AGX Orin: aarch64, CUDA; the apache-tvm 0.27 wheels link libcudart.so.13, "
                                  "so the board needs the CUDA 13 runtime (JetPack 7.x)"),
    "jetson-orin-nano": BundlePlatform("aarch64", True, "3.10", "Jetson Orin Nano: as jetson-orin"),
    "cpu-aarch64": BundlePlatform("aarch64", False, "3.10", "aarch64 Linux CPU"),
    "cpu": BundlePlatform("x86_64", False, "3.11", "x86-64 Linux CPU"),
}
for _sm in ("86", "89", "90", "120"):
    PLATFORMS[f"cuda-sm{_sm}"] = BundlePlatform("x86_64", True, "3.12", "x86-64 Linux with an NVIDIA GPU, CUDA 13 runtime")

DEPS = ("numpy", "tokenizers", "jinja2", "markupsafe", "typing_extensions")


def _version(dist: str, default: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return default


def _pip_download(reqs: list[str], plat: BundlePlatform, python: str, dest: Path) -> None:
    tags = _AARCH64 if plat.arch == "aarch64" else _X86
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", python, "--implementation", "cp", "-d", str(dest)]
    for t in tags:
        cmd += ["--platform", t]
    res = subprocess.run(cmd + reqs, capture_output=True, text=True)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise UserError(f"pip download of {' '.join(reqs)} for {plat.arch} / Python {python} failed: {last} "
                        f"(on an offline machine pass --wheel-dir with the wheels)")


def _find_wheel(folder: Path, dist: str, arch: str | None) -> Path | None:
    stem = dist.replace("-", "_").lower()
    for p in sorted(folder.glob("*.whl")):
        name = p.name.lower()
        if name.startswith(stem + "-") and (arch is None or arch in name or "none-any" in name):
            return p
    return None


def make_bundle(target: str, out: Path, python: str | None = None, wheel_dir: Path | None = None,
                with_deps: bool = False) -> Path:
    if target not in PLATFORMS:
        raise UserError(f"--target {target!r}: unknown; one of {', '.join(PLATFORMS)}")
    plat = PLATFORMS[target]
    python = python or plat.python
    out = Path(out)
    if out.suffixes[-2:] != [".tar", ".gz"] and out.suffix != ".tgz":
        raise UserError(f"--out {out}: expected a .tar.gz or .tgz file name")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    tvm_ver = _version("apache-tvm", "0.27.0.post1")
    ffi_ver = _version("apache-tvm-ffi", "0.1.15.post2")

    with tempfile.TemporaryDirectory(prefix=".bundle-", dir=out.parent) as tmp:
        tmp = Path(tmp)
        wheels = tmp / "dl"
        wheels.mkdir()
        if wheel_dir is not None:
            if not Path(wheel_dir).is_dir():
                raise UserError(f"--wheel-dir {wheel_dir}: not a folder")
            for p in Path(wheel_dir).glob("*.whl"):
                shutil.copy(p, wheels / p.name)
        else:
            reqs = [f"apache-tvm=={tvm_ver}", f"apache-tvm-ffi=={ffi_ver}"]
            if with_deps:
                reqs += list(DEPS)
            _pip_download(reqs, plat, python, wheels)
        tvm_whl = _find_wheel(wheels, "apache-tvm", plat.arch)
        ffi_whl = _find_wheel(wheels, "apache-tvm-ffi", plat.arch)
        for what, w in (("apache-tvm", tvm_whl), ("apache-tvm-ffi", ffi_whl)):
            if w is None:
                raise UserError(f"no {what} wheel for {plat.arch} found (looked in {wheel_dir or 'the pip download'})")

        root = tmp / "awq-edge-runtime"
        pkg = root / "runtime"
        shutil.copytree(RUNTIME_DIR, pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "_tvmlib"))
        libdir = pkg / "_tvmlib"
        libdir.mkdir()
        wanted = ["libtvm_runtime.so"] + (["libtvm_runtime_cuda.so"] if plat.cuda else [])
        with zipfile.ZipFile(tvm_whl) as z:
            names = {Path(n).name: n for n in z.namelist() if "/lib/" in n}
            for lib in wanted:
                if lib not in names:
                    raise UserError(f"{tvm_whl.name}: holds no {lib}")
                (libdir / lib).write_bytes(z.read(names[lib]))
        (root / "wheels").mkdir()
        shutil.copy(ffi_whl, root / "wheels" / ffi_whl.name)
        for dep in DEPS if with_deps else ():
            w = _find_wheel(wheels, dep, None)
            if w is not None:
                shutil.copy(w, root / "wheels" / w.name)
        (root / "install.sh").write_text(_INSTALL_SH)
        os.chmod(root / "install.sh", 0o755)
        (root / "README.txt").write_text(_README.format(target=target, note=plat.note, python=python,
                                                        tvm=tvm_ver, ffi=ffi_ver, libs=", ".join(wanted)))
        part = tmp / "bundle.tar.gz"
        with tarfile.open(part, "w:gz") as tar:
            tar.add(root, arcname=root.name)
        os.replace(part, out)  # same folder: atomic; nothing half-written at `out`
    return out


_INSTALL_SH = """#!/bin/sh
# Install the awq-edge runtime into a virtual environment (default ./awq-edge-venv), no build step.
set -e
HERE=$(cd "$(dirname "$0")" && pwd)
VENV=${1:-awq-edge-venv}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --no-index --find-links "$HERE/wheels" "$HERE"/wheels/*.whl 2>/dev/null \\
  || "$VENV/bin/pip" install -q "$HERE"/wheels/*.whl numpy tokenizers jinja2
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp -r "$HERE/runtime" "$SITE/"
echo "installed; run: $VENV/bin/python -m runtime.cli run ARTIFACT --prompt 'Hello'"
"""

_README = """awq-edge runtime bundle for {target} ({note}).
Python {python}; TVM runtime libraries from apache-tvm {tvm} ({libs}); apache-tvm-ffi {ffi}.
No torch, no transformers, no TVM compiler.

Install:   sh install.sh [VENV]
Run:       VENV/bin/python -m runtime.cli run ARTIFACT --prompt "What is the capital of France?" --chat
Chat:      VENV/bin/python -m runtime.cli chat ARTIFACT
Bench:     VENV/bin/python -m runtime.cli bench ARTIFACT
The TVM libraries are found in runtime/_tvmlib (or set AWQ_EDGE_TVM_LIB to another folder);
libcudart.so.13 is found through the dynamic loader (or set AWQ_EDGE_CUDART to its path).
"""
