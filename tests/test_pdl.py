"""Programmatic dependent launch (tvm_kernels/pdl.py): which targets get it, and, in a whole exported model
for sm_90a, that every kernel waits for its predecessor before it reads anything an earlier kernel writes
(the GEMV may load its weights first, nothing else), then releases its successor, and is launched with
the attribute. Its speed and numerics on the GPU: benchmarks/e2e.py (H100)."""
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tvm_kernels.targets import get_target

REPO = Path(__file__).resolve().parent.parent
TAG = b"tirx.use_programtic_dependent_launch"


def test_targets_with_pdl_and_the_default():
    from tvm_kernels.pdl import default_on

    assert get_target("cuda-sm90").pdl and get_target("cuda-sm120").pdl
    for name in ("jetson-orin", "cuda-sm86", "cuda-sm89", "cpu", "cpu-aarch64"):
        assert not get_target(name).pdl and not default_on(name, 576), name
    # measured: faster for SmolLM2 (hidden 576), slower for the 7B shape (4096)
    assert default_on("cuda-sm90", 576) and not default_on("cuda-sm90", 4096)


def test_pdl_flag_resolution():
    from export.errors import UserError
    from export.exporter import resolve_pdl
    from export.model import config_from_hf

    hf = dict(architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
              num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    cfg = config_from_hf(hf, "config", group_size=128)
    sm90, orin = get_target("cuda-sm90"), get_target("jetson-orin")
    assert resolve_pdl("auto", sm90, cfg) is False and resolve_pdl("on", sm90, cfg) is True
    assert resolve_pdl("off", sm90, cfg) is False and resolve_pdl("auto", orin, cfg) is False
    with pytest.raises(UserError, match="--pdl on: target jetson-orin"):
        resolve_pdl("on", orin, cfg)


_BUILD = textwrap.dedent(
    """
    import sys
    from tvm_kernels.cuda_env import prepare_cuda_build
    prepare_cuda_build()
    from export.exporter import build_library, config_from_hf, resolve_target
    hf = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=256, intermediate_size=512,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
              max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    cfg = config_from_hf(hf, "config", group_size=32, context_length=256, prefill_chunk_size=None)
    out, target, pdl = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    ex, _ = build_library(cfg, resolve_target(target), "tvm_kernels", True, pdl)

    def modules(m):
        yield m
        for i in m.imports:
            yield from modules(i)

    open(out + ".cu", "w").write(next(m for m in modules(ex.mod) if m.kind == "cuda").inspect_source())
    ex.export_library(out + ".so")
    """
)
_DECL = re.compile(r"^(alignas\(\d+\) |__shared__ |extern __shared__ |nvcuda::wmma::fragment<)")


def _build(tmp_path: Path, target: str, pdl: bool) -> tuple[str, bytes]:
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed: CUDA builds need the CUDA toolkit")
    out = tmp_path / f"{target}-{int(pdl)}"
    proc = subprocess.run([sys.executable, "-c", _BUILD, str(out), target, str(int(pdl))], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out.with_suffix(".cu").read_text(), out.with_suffix(".so").read_bytes()


def _kernels(src: str) -> dict[str, list[str]]:
    """name -> body lines of every kernel definition in generated CUDA source."""
    out = {}
    for m in re.finditer(r'^extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\([^;{]*\) \{\n(.*?)\n\}\n',
                         src, re.S | re.M):
        out[m.group(1)] = [line.strip() for line in m.group(2).split("\n")]
    return out


@pytest.mark.cuda_build
def test_every_kernel_waits_before_reading_what_others_write(tmp_path):
    src, lib = _build(tmp_path, "cuda-sm90", True)
    kernels = _kernels(src)
    assert src.count('extern "C" __global__') == 2 * len(kernels) > 20  # declarations + definitions, all parsed
    assert any(k.startswith("gemv_w4a16") for k in kernels) and any("decode" in k for k in kernels)
    for name, body in kernels.items():
        waits = [i for i, line in enumerate(body) if line == "awq_pdl_wait();"]
        releases = [i for i, line in enumerate(body) if line == "awq_pdl_launch_dependents();"]
        assert len(waits) == 1 and releases == [waits[0] + 1], name
        before = body[:waits[0]]
        if name.startswith("gemv_w4a16"):
            # its own weights, scales and zeros only: never the activations (xu) or the output (y)
            assert any("weight_ptr" in line for line in before), name
            assert not any(re.search(r"\b(xu|y)_ptr\b", line) for line in before), (name, before)
        else:
            assert all(_DECL.match(line) for line in before), (name, before)
    # each kernel is launched with the attribute: the tag is stored once per kernel in the library
    assert lib.count(TAG) == len(kernels)


@pytest.mark.cuda_build
def test_export_without_pdl_launches_plainly(tmp_path):
    src, lib = _build(tmp_path, "cuda-sm90", False)
    assert TAG not in lib and "griddepcontrol" not in src


def test_targets_before_sm90_get_nothing():
    import tvm

    from tvm_kernels.gemv_w4a16 import gemv_w4a16
    from tvm_kernels.pdl import MANUAL_ATTR, apply_pdl

    f = gemv_w4a16(512, 256, 32, "cuda-sm89")
    assert MANUAL_ATTR not in (f.attrs or {}) and "awq_pdl" not in f.script()
    assert MANUAL_ATTR in gemv_w4a16(512, 256, 32, "cuda-sm90").attrs
    mod = tvm.IRModule({"main": f})
    assert apply_pdl("cuda-sm89")(mod).same_as(mod) or tvm.ir.structural_equal(apply_pdl("cuda-sm89")(mod), mod)
