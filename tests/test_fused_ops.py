"""Fused residual add + RMSNorm against its numpy reference (llvm in CI), and the CUDA build."""
import subprocess
import sys
import textwrap
from pathlib import Path
import shutil

import numpy as np
import pytest

from tvm_kernels.fused_ops import add_rms_norm, reference, thread_config
from tvm_kernels.targets import get_target

tvm = pytest.importorskip("tvm")
REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("H,M,residual", [(576, 1, True), (576, 17, True), (100, 3, True), (576, 5, False), (4096, 2, True)])
def test_cpu_add_rms_norm_matches_reference(H, M, residual):
    rng = np.random.default_rng(H + M)
    a = (3 * rng.standard_normal((M, H))).astype(np.float16)
    b = rng.standard_normal((M, H)).astype(np.float16)
    w = (1 + 0.3 * rng.standard_normal(H)).astype(np.float16)
    f = add_rms_norm(H, 1e-5, "cpu", residual=residual)
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=get_target("cpu").tvm_target())
    y = np.full((M, H), np.nan, np.float16)
    s = np.full((M, H), np.nan, np.float16)
    args = [a, b, w, y, s] if residual else [a, w, y]
    t = [tvm.runtime.tensor(x) for x in args]
    lib["main"](*t)
    y_ref, s_ref = reference(a, b if residual else None, w, 1e-5)
    np.testing.assert_allclose(t[3 if residual else 2].numpy().astype(np.float32), y_ref, rtol=2e-3, atol=2e-3)
    if residual:
        np.testing.assert_array_equal(t[4].numpy().astype(np.float32), s_ref)


def test_reference_is_rms_norm():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 64)).astype(np.float16)
    w = rng.standard_normal(64).astype(np.float16)
    y, s = reference(a, None, w, 1e-6)
    x = a.astype(np.float64)
    np.testing.assert_allclose(y, x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("H", [576, 896, 2048, 4096, 5120, 8192, 100, 7])
def test_thread_config_covers_the_row(H):
    tx, chunks, vec = thread_config(H, 1024)
    assert tx * chunks * vec == H and tx <= 1024


_BUILD = textwrap.dedent(
    """
    import sys
    from tvm_kernels.cuda_env import prepare_cuda_build
    prepare_cuda_build()
    import tvm
    from tvm_kernels.fused_ops import add_rms_norm
    from tvm_kernels.targets import get_target
    t = get_target("cuda-sm90")
    funcs = {"add_norm_576": add_rms_norm(576, 1e-5, t), "add_norm_4096": add_rms_norm(4096, 1e-5, t),
             "norm_4096": add_rms_norm(4096, 1e-5, t, residual=False)}
    mod = tvm.IRModule({k: f.with_attr("global_symbol", k) for k, f in funcs.items()})
    with t.tvm_target() as target:
        lib = tvm.compile(mod, target=target)
    open(sys.argv[2], "w").write(lib.mod.imports[0].inspect_source())
    lib.export_library(sys.argv[1])
    """
)


def test_cuda_add_rms_norm_builds_sm90(tmp_path):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed: CUDA builds need the CUDA toolkit")
    from tvm_kernels.cuda_env import check_cubin

    out, src = tmp_path / "k.so", tmp_path / "k.cu"
    proc = subprocess.run([sys.executable, "-c", _BUILD, str(out), str(src)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_cubin(out, "sm_90")
    # the per-thread row slice and the block's sum stay on chip: only the five tensors are kernel arguments
    for line in src.read_text().splitlines():
        if line.startswith('extern "C" __global__'):
            params = line[line.index("(") + 1:line.rindex(")")]
            assert "_loc" not in params and "total" not in params and "part" not in params, line
