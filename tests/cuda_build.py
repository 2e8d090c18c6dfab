"""Build TIR kernels for a CUDA target in a subprocess (the CUDA build set-up, a stub libcuda and nvcc,
stays out of the test process) and check that the library holds real cubins for the architecture."""
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

_SCRIPT = """
import sys
from tvm_kernels.cuda_env import prepare_cuda_build
prepare_cuda_build()
import tvm
from tvm_kernels.targets import get_target
t = get_target(sys.argv[2])
{setup}
mod = tvm.IRModule({{k: f.with_attr("global_symbol", k) for k, f in funcs.items()}})
with t.tvm_target() as target:
    lib = tvm.compile(mod, target=target)
lib.export_library(sys.argv[1])
"""


def build_and_check_cubin(tmp_path: Path, target: str, arch: str, setup: str) -> None:
    """`setup`: Python lines that define `funcs` (symbol name -> PrimFunc) from `t`, the DeviceTarget."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed: CUDA builds need the CUDA toolkit")
    from tvm_kernels.cuda_env import check_cubin

    out = tmp_path / "kernels.tar"  # a .tar needs no (cross) linker and holds the same device blob
    script = _SCRIPT.format(setup=textwrap.dedent(setup).strip())
    proc = subprocess.run([sys.executable, "-c", script, str(out), target], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_cubin(out, arch)
