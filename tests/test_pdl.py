"""Programmatic dependent launch (tvm_kernels/pdl.py): which targets get it, and, in a whole exported model
for sm_90a, that every kernel waits for its predecessor before it reads or writes anything, then releases
its successor, and is launched with the attribute, except the prefill GEMMs, which launch plainly. Its
speed and numerics on the GPU: benchmarks/e2e.py (H100, pdl_ab_h100.json)."""
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


def test_targets_with_pdl():
    assert get_target("cuda-sm90").pdl and get_target("cuda-sm120").pdl
    for name in ("jetson-orin", "cuda-sm86", "cuda-sm89", "cpu", "cpu-aarch64"):
        assert not get_target(name).pdl, name


def test_pdl_flag_resolution():
    from export.errors import UserError
    from export.exporter import resolve_pdl

    sm90, orin = get_target("cuda-sm90"), get_target("jetson-orin")
    assert resolve_pdl("auto", sm90) is True and resolve_pdl("on", sm90) is True
    assert resolve_pdl("off", sm90) is False and resolve_pdl("auto", orin) is False
    with pytest.raises(UserError, match="--pdl on: target jetson-orin"):
        resolve_pdl("on", orin)
    with pytest.raises(UserError, match="--pdl 'yes'"):
        resolve_pdl("yes", sm90)


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
    ex, _ = build_library(cfg, resolve_target(target), "tvm_kernels", "regions", pdl)

    def modules(m):
        yield m
        for i in m.imports:
            yield from modules(i)

    open(out + ".cu", "w").write(next(m for m in modules(ex.mod) if m.kind == "cuda").inspect_source())
    open(out + ".vm.txt", "w").write(ex.as_text())
    ex.export_library(out + ".so")
    """
)
_DECL = re.compile(r"^(alignas\(\d+\) |__shared__ |extern __shared__ |nvcuda::wmma::fragment<)")


def _build(tmp_path: Path, target: str, pdl: bool) -> tuple[str, bytes]:
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed: CUDA builds need the CUDA toolkit")
    out = tmp_path / f"{target}-{int(pdl)}"
    if not out.with_suffix(".so").is_file():
        proc = subprocess.run([sys.executable, "-c", _BUILD, str(out), target, str(int(pdl))], cwd=REPO,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out.with_suffix(".cu").read_text(), out.with_suffix(".so").read_bytes()


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    """One folder for the module's builds: the sm_90 PDL export serves two tests."""
    return tmp_path_factory.mktemp("pdl_builds")


def _kernels(src: str) -> dict[str, list[str]]:
    """name -> body lines of every kernel definition in generated CUDA source."""
    out = {}
    for m in re.finditer(r'^extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\([^;{]*\) \{\n(.*?)\n\}\n',
                         src, re.S | re.M):
        out[m.group(1)] = [line.strip() for line in m.group(2).split("\n")]
    return out


@pytest.mark.cuda_build
def test_every_kernel_waits_before_touching_memory(build_dir):
    src, lib = _build(build_dir, "cuda-sm90", True)
    kernels = _kernels(src)
    assert src.count('extern "C" __global__') == 2 * len(kernels) > 20  # declarations + definitions, all parsed
    gemms = [k for k in kernels if k.startswith("gemm_w4a16")]
    assert gemms and any(k.startswith("gemv_w4a16") for k in kernels) and any("decode" in k for k in kernels)
    for name, body in kernels.items():
        waits = [i for i, line in enumerate(body) if line == "awq_pdl_wait();"]
        releases = [i for i, line in enumerate(body) if line == "awq_pdl_launch_dependents();"]
        if name in gemms:  # the prefill GEMMs launch plainly
            assert not waits and not releases, name
            continue
        assert len(waits) == 1 and releases == [waits[0] + 1], name
        assert all(_DECL.match(line) for line in body[:waits[0]]), (name, body[:waits[0]])
    # each kernel launched with the attribute stores the tag once in the library: all but the GEMMs
    assert lib.count(TAG) == len(kernels) - len(gemms)


@pytest.mark.cuda_build
def test_export_without_pdl_launches_plainly(tmp_path):
    src, lib = _build(tmp_path, "cuda-sm90", False)
    assert TAG not in lib and "griddepcontrol" not in src


def test_targets_before_sm90_get_nothing():
    import tvm

    from tvm_kernels.gemv_w4a16 import gemv_w4a16
    from tvm_kernels.pdl import apply_pdl

    mod = tvm.IRModule({"main": gemv_w4a16(512, 256, 32, "cuda-sm89")})
    assert apply_pdl("cuda-sm89")(mod).same_as(mod)
    assert "awq_pdl_wait" in apply_pdl("cuda-sm90")(mod)["main"].script()


@pytest.mark.cuda_build
def test_decode_folds_the_norms_into_the_gemvs(build_dir):
    # export/model.py Layer.stream: on CUDA, decode runs each add + RMSNorm inside the GEMVs around it, so
    # per layer it calls the norm-prologue GEMV twice (qkv; gate_up, gated), the residual-epilogue GEMV twice
    # (o_proj, down) and no norm kernel but the final one; prefill keeps the norm kernels
    _build(build_dir, "cuda-sm90", True)
    text = (build_dir / "cuda-sm90-1.vm.txt").read_text()
    funcs = {m.group(1): m.group(2) for m in re.finditer(r"^@(\w+):\n(.*?)(?=^@\w+:$|\Z)", text, re.S | re.M)}
    # a function's CUDA-graph part is a VM function of its own (decode_cuda_graph_capture...)
    decode = "".join(body for name, body in funcs.items() if name.startswith("decode"))
    prefill = funcs["prefill"]
    layers = 2

    def calls(body, prefix):
        return len(re.findall(rf"call  {prefix}\w*\s+in:", body))

    assert calls(decode, "gemv_w4a16_norm_n") == layers and calls(decode, "gemv_w4a16_norm_silu_n") == layers
    assert calls(decode, "gemv_w4a16_add_n") == 2 * layers
    assert calls(decode, "add_rms_norm") == 0 and calls(decode, "rms_norm") == 1
    assert calls(prefill, "add_rms_norm") == 2 * layers
