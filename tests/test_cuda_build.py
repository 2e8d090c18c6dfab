"""CUDA kernels compile here without a GPU (stub libcuda + nvcc) into real cubins, not embedded source."""
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tvm_kernels.cuda_env import check_cubin, fatbin_entries
from tvm_kernels.errors import UserError
from tvm_kernels.targets import TARGETS, get_target

REPO = Path(__file__).resolve().parent.parent

# Run in a subprocess: the stub libcuda and the nvcc callback stay out of the pytest process.
_BUILD = textwrap.dedent(
    """
    import sys
    from tvm_kernels.cuda_env import prepare_cuda_build
    prepare_cuda_build(embed_ptx=sys.argv[3] == "ptx")
    import tvm
    from tvm_kernels.gemv_w4a16 import CudaConfig, L2Prefetch, gemv_w4a16
    from tvm_kernels.targets import get_target
    t = get_target(sys.argv[1])
    funcs = {
        "gemv_m1": gemv_w4a16(4096, 4096, 128, t, M=1),
        "gemv_odd_m3": gemv_w4a16(100, 576, 64, t, M=3),
        "gemv_m8_g32": gemv_w4a16(960, 352, 32, t, M=8),
        # K split over warps with a predicated tail (down_proj-like)
        "gemv_ksplit_tail": gemv_w4a16(96, 11008, 128, t, M=1, config=CudaConfig(32, 2, 4, 4, ksplit=2)),
        # the gated MLP epilogue (act(gate) * up), one row per thread by default (SmolLM2's gate_up) and K split
        "gemv_glu_silu": gemv_w4a16(3072, 576, 64, t, M=1, glu="silu"),
        "gemv_glu_gelu_ksplit": gemv_w4a16(512, 11008, 128, t, M=1, glu="gelu_tanh"),
        # the norm prologue (alone, with the gated epilogue) and the residual epilogue (K split)
        "gemv_norm": gemv_w4a16(960, 576, 64, t, M=1, norm_eps=1e-5),
        "gemv_norm_glu": gemv_w4a16(3072, 576, 64, t, M=1, glu="silu", norm_eps=1e-6),
        "gemv_residual_ksplit": gemv_w4a16(4096, 11008, 128, t, M=1, residual=True),
    }
    if t.sm >= 90:  # the L2 prefetch epilogue (sm_90's bulk prefetch): a gated GEMV prefetching down_proj's rows
        funcs["gemv_glu_prefetch"] = gemv_w4a16(3072, 576, 64, t, M=1, glu="silu",
                                                prefetch=L2Prefetch(576, 1536, 64, 576))
    mod = tvm.IRModule({k: f.with_attr("global_symbol", k) for k, f in funcs.items()})
    with t.tvm_target() as target:
        lib = tvm.compile(mod, target=target)
    lib.export_library(sys.argv[2])
    """
)


def _build(tmp_path, target, suffix, ptx):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed: CUDA builds need the CUDA toolkit")
    out = tmp_path / f"{target}{suffix}"
    proc = subprocess.run(
        [sys.executable, "-c", _BUILD, target, str(out), "ptx" if ptx else "noptx"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_gemv_builds_sm90_cubin(tmp_path):
    lib = _build(tmp_path, "cuda-sm90", ".so", ptx=False)
    entries = check_cubin(lib, "sm_90")
    assert ("ptx", 90) not in entries
    with pytest.raises(UserError, match="sm_87"):
        check_cubin(lib, "sm_87")


def test_gemv_builds_orin_cubin_with_ptx(tmp_path):
    # the Orin target has an aarch64 host: a .tar needs no cross linker and holds the same device blob
    lib = _build(tmp_path, "jetson-orin", ".tar", ptx=True)
    entries = check_cubin(lib, "sm_87", ptx=True)
    assert set(entries) == {("ptx", 87), ("cubin", 87)}


def test_check_cubin_rejects_source_and_junk(tmp_path):
    src = tmp_path / "src.so"
    src.write_bytes(b"\x7fELF...extern \"C\" __global__ void k() {}")
    with pytest.raises(UserError, match="source"):
        check_cubin(src, "sm_90")
    with pytest.raises(UserError, match="no CUDA fatbin"):
        check_cubin(b"\x7fELF nothing here", "sm_90")
    assert fatbin_entries(b"") == []


def test_target_registry():
    for name in ["jetson-orin", "jetson-orin-nano", "cuda-sm86", "cuda-sm89", "cuda-sm90", "cuda-sm120", "cpu", "cpu-aarch64"]:
        assert name in TARGETS
    orin = get_target("jetson-orin")
    assert orin.arch == "sm_87" and orin.num_sms == 16 and orin.cross_compiler == "aarch64-linux-gnu-g++"
    assert get_target("jetson-orin-nano").num_sms == 8
    assert get_target("cpu-aarch64").cross_compiler == "aarch64-linux-gnu-g++"
    with pytest.raises(UserError, match="known targets"):
        get_target("sm_90")
    t = orin.tvm_target()
    assert str(t.arch) == "sm_87" and "aarch64" in str(t.host.attrs["mtriple"])
