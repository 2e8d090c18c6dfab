"""Export: tiny random models of each family -> cpu artifact -> run with the TVM runtime alone ->
logits against transformers (float32) on the same weights; CUDA / Jetson libraries; artifact checks;
bad input.

Tolerances (stated): the TVM module runs in FP16 (activations, weights, KV cache) with float32
accumulation in the matmuls; the reference is transformers in float32 on the same FP16 (or
dequantized W4) weights. Logits must agree within 0.02 + 2% of the largest |logit|; greedy tokens
must be identical.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

GROUP = 64
PROMPT = [3, 17, 200, 42, 7, 99, 123, 5, 64, 31, 250, 11, 8]  # 13 tokens: prefill in chunks of 8 + 5
DECODE_STEPS = 6

# Runs in a fresh interpreter where importing the TVM compiler (and torch) is an error: only
# tvm_ffi, libtvm_runtime.so, numpy and the artifact.
_DRIVER = r"""
import ctypes, importlib.abc, importlib.util, json, sys
from pathlib import Path
tvm_lib = Path(list(importlib.util.find_spec("tvm").submodule_search_locations)[0]) / "lib"

class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tvm", "torch", "transformers"):
            raise ImportError(f"{name} is blocked: the runtime path must not need it")
sys.meta_path.insert(0, _Block())
import numpy as np
import tvm_ffi
ctypes.CDLL(str(tvm_lib / "libtvm_runtime.so"), mode=ctypes.RTLD_GLOBAL)
sys.path.insert(0, sys.argv[4])
from runtime.manifest import Manifest
from runtime.weights import ParamReader

art, ids, steps = Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
man = Manifest.load(art)
w = ParamReader(art)  # params.safetensors or the shards, as the manifest says
params = [tvm_ffi.from_dlpack(np.array(w.get(p))) for p in man.params]
vm = tvm_ffi.load_module(str(art / man.library))["vm_load_executable"]()
vm["vm_initialization"](1, 0, 2, 1, 0, 2)
kvc = man.kv_cache
kv = vm["create_kv_cache"](*[tvm_ffi.Shape([v]) for v in (1, kvc["max_total_seq_len"], kvc["prefill_chunk_size"], kvc["page_size"], 0)])
g = tvm_ffi.get_global_func
g("vm.builtin.kv_state_add_sequence")(kv, 0)

def forward(fn, toks):
    emb = np.from_dlpack(vm["embed"](tvm_ffi.from_dlpack(np.asarray(toks, np.int32)), params))
    emb = np.ascontiguousarray(emb.reshape(1, len(toks), -1))
    g("vm.builtin.kv_state_begin_forward")(kv, tvm_ffi.Shape([0]), tvm_ffi.Shape([len(toks)]))
    out = np.from_dlpack(vm[fn](tvm_ffi.from_dlpack(emb), kv, params)).copy()
    g("vm.builtin.kv_state_end_forward")(kv)
    return out

chunk = kvc["prefill_chunk_size"]
pieces = [forward("prefill_logits", ids[i:i + chunk])[0] for i in range(0, len(ids), chunk)]
prefill = np.concatenate(pieces)
toks, dec = [], []
nxt = int(prefill[-1].argmax())
for _ in range(steps):
    toks.append(nxt)
    logits = forward("decode", [nxt])[0, 0]
    dec.append(logits)
    nxt = int(logits.argmax())
np.savez(sys.argv[5], prefill=prefill, tokens=np.array(toks), decode=np.array(dec))
assert "tvm" not in sys.modules and "torch" not in sys.modules and "export" not in sys.modules
"""


def run_artifact(art: Path, ids: list[int], steps: int, tmp: Path) -> dict[str, np.ndarray]:
    out = tmp / "run.npz"
    proc = subprocess.run([sys.executable, "-c", _DRIVER, str(art), json.dumps(ids), str(steps), str(REPO), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(out))


# ---------------------------------------------------------------------------------------------
# checkpoints

def write_tokenizer(folder: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}",
        "eos_token": "t1", "bos_token": "t0"}))


def rtn_awq(w: np.ndarray, group: int):
    """float W [N, K] -> (qweight, qzeros, scales) AutoAWQ GEMM tensors, and the dequantized W."""
    from tvm_kernels.awq_layout import pack_awq

    N, K = w.shape
    g = w.astype(np.float32).reshape(N, K // group, group)
    mx, mn = g.max(-1), g.min(-1)
    s = np.maximum((mx - mn) / 15, 1e-5).astype(np.float16).astype(np.float32)
    z = np.clip(np.round(-mn / s), 0, 15)
    q = np.clip(np.round(g / s[..., None]) + z[..., None], 0, 15)
    deq = ((q - z[..., None]) * s[..., None]).reshape(N, K)
    # pack_awq of a transposed view comes back Fortran-ordered; safetensors wants C order.
    tensors = (np.ascontiguousarray(pack_awq(q.reshape(N, K).T.astype(np.uint32))),
               np.ascontiguousarray(pack_awq(z.T.astype(np.uint32))),
               np.ascontiguousarray(s.T.astype(np.float16)))
    return tensors, deq


def make_checkpoint(family: str, folder: Path, awq: bool):
    """A tiny random model saved as an FP16 HF folder (awq=False) or an AutoAWQ GEMM folder.
    Returns the transformers float32 model holding exactly the weights the export sees."""
    from tiny_models import tiny_model

    return save_checkpoint(*tiny_model(family), folder, awq)


def save_checkpoint(model, cfg, folder: Path, awq: bool):
    """`model` saved as in make_checkpoint (every linear of the decoder layers RTN-quantized when awq)."""
    import torch
    from safetensors.numpy import save_file

    model = model.half().float()  # the FP16 checkpoint's values, computed in float32
    folder.mkdir(parents=True)
    cfg_dict = cfg.to_dict()
    cfg_dict["architectures"] = [type(model).__name__]
    cfg_dict["torch_dtype"] = "float16"
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    tensors = {}
    for name, w in state.items():
        if awq and name.endswith(".weight") and ".layers." in name and w.ndim == 2 and "vision" not in name:
            (qw, qz, sc), deq = rtn_awq(w, GROUP)
            p = name[: -len(".weight")]
            tensors.update({f"{p}.qweight": qw, f"{p}.qzeros": qz, f"{p}.scales": sc})
            state[name] = deq
        elif name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        else:
            tensors[name] = w.astype(np.float16)
    if awq:
        cfg_dict["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": GROUP,
                                           "zero_point": True, "version": "gemm"}
        model.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in state.items()})
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg_dict))
    write_tokenizer(folder, cfg.get_text_config().vocab_size)
    return model


def reference_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def assert_close(got: np.ndarray, ref: np.ndarray, what: str) -> None:
    tol = 0.02 + 0.02 * float(np.abs(ref).max())
    err = float(np.abs(got - ref).max())
    assert err <= tol, f"{what}: max |tvm - transformers| = {err:.4g} > {tol:.4g}"


def assert_matches_transformers(model, art: Path, prompt: list[int], steps: int, tmp: Path, what: str) -> None:
    """The artifact, driven by the runtime alone, against transformers on the same weights: prefill and
    decode logits within assert_close's tolerance, greedy tokens identical."""
    out = run_artifact(art, prompt, steps, tmp)
    full = prompt + [int(t) for t in out["tokens"]]
    ref = reference_logits(model, full)
    n = len(prompt)
    assert_close(out["prefill"], ref[:n], f"{what} prefill")
    assert_close(out["decode"], ref[n:n + steps], f"{what} decode")
    np.testing.assert_array_equal(out["tokens"], ref[n - 1:n - 1 + steps].argmax(-1))


# ---------------------------------------------------------------------------------------------
# cpu: numerics through the runtime alone

CASES = [("llama", False), ("llama", True), ("qwen2", True), ("mistral", True), ("qwen2", False), ("qwen2_5_vl", True)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(family, awq) -> (transformers model, artifact folder); each exported once per module."""
    from export.exporter import export_checkpoint

    cache = {}

    def get(family: str, awq: bool):
        if (family, awq) not in cache:
            root = tmp_path_factory.mktemp(f"{family}-{'awq' if awq else 'fp16'}")
            model = make_checkpoint(family, root / "ckpt", awq)
            summary = export_checkpoint(root / "ckpt", "cpu", root / "art", context_length=64, prefill_chunk=8)
            assert summary["quantized"] is awq
            cache[family, awq] = model, root / "art"
        return cache[family, awq]

    return get


@pytest.mark.parametrize("family,awq", CASES, ids=[f"{f}-{'awq' if a else 'fp16'}" for f, a in CASES])
def test_cpu_export_matches_transformers(tmp_path, exported, family, awq):
    from runtime.manifest import Manifest

    model, art = exported(family, awq)
    man = Manifest.load(art)
    assert set(man.functions) >= {"create_kv_cache", "embed", "prefill", "prefill_logits", "decode", "argmax"}
    assert "sample" not in man.functions  # CUDA only: the CPU runtime samples on the host
    assert man.quantization is None if not awq else man.quantization["group_size"] == GROUP
    assert man.kv_cache["max_total_seq_len"] == 64 and man.kv_cache["prefill_chunk_size"] == 8
    assert man.tokenizer["chat_template"].startswith("{% for m in messages %}")
    if awq:  # one fused q/k/v weight in the kernel layout
        qkv = next(p for p in man.params if p["name"].endswith("layers.0.self_attn.qkv_proj.weight"))
        tc = model.config.get_text_config()
        H, KV = tc.num_attention_heads, tc.num_key_value_heads
        D = getattr(tc, "head_dim", None) or tc.hidden_size // H
        assert qkv["dtype"] == "uint32" and qkv["shape"] == [(H + 2 * KV) * D, tc.hidden_size // 8]

    assert_matches_transformers(model, art, PROMPT, DECODE_STEPS, tmp_path, f"{family} (prefill in chunks of 8)")


def test_prefill_last_logits_and_weights_roundtrip(tmp_path):
    """`prefill` returns the last position's logits; the streamed params file reads back with safetensors."""
    from safetensors.numpy import load_file

    from export.exporter import export_checkpoint
    from runtime.manifest import Manifest
    from tvm_kernels.layout import dequantize_kernel_layout

    ckpt = tmp_path / "ckpt"
    model = make_checkpoint("llama", ckpt, awq=True)
    art = tmp_path / "art"
    export_checkpoint(ckpt, "cpu", art, context_length=64, prefill_chunk=16, kernels="dequant")
    man = Manifest.load(art)
    w = load_file(str(art / "params.safetensors"))
    assert list(w) == [p["name"] for p in man.params] or set(w) == {p["name"] for p in man.params}
    sd = model.state_dict()
    pre = "model.layers.1.mlp.gate_up_proj"
    got = dequantize_kernel_layout(w[f"{pre}.weight"], w[f"{pre}.scales"], w[f"{pre}.zeros"], GROUP)
    gate, up = sd["model.layers.1.mlp.gate_proj.weight"].numpy(), sd["model.layers.1.mlp.up_proj.weight"].numpy()
    want = np.stack([gate, up], axis=1).reshape(-1, gate.shape[1])  # rows interleaved: gate_j, up_j
    np.testing.assert_allclose(got, want, atol=1e-3)
    out = run_artifact(art, PROMPT, 2, tmp_path)
    ref = reference_logits(model, PROMPT + [int(t) for t in out["tokens"]])
    assert_close(out["prefill"], ref[: len(PROMPT)], "dequant-path prefill")


# ---------------------------------------------------------------------------------------------
# CUDA and Jetson builds (nvcc + stub libcuda, in a fresh process: the stub must precede `import tvm`)

def _elf_machine(path: Path) -> int:
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF", f"{path} is not an ELF file"
    return int.from_bytes(head[18:20], "little")


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "awq_edge.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.cuda_build
@pytest.mark.parametrize("target,arch,machine", [("cuda-sm90", "sm_90a", 0x3E), ("jetson-orin", "sm_87", 0xB7)])
def test_cuda_exports_hold_cubins(tmp_path, target, arch, machine):
    import shutil

    from tvm_kernels.cuda_env import check_cubin

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed")
    if target == "jetson-orin" and shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("aarch64-linux-gnu-g++ not installed (apt-get install g++-aarch64-linux-gnu)")
    ckpt = tmp_path / "ckpt"
    make_checkpoint("llama", ckpt, awq=True)
    art = tmp_path / "art"
    proc = _cli("export", ckpt, "--target", target, "--out", art, "--context-length", "128")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lib = art / "model.so"
    assert _elf_machine(lib) == machine  # 0x3E x86-64, 0xB7 aarch64
    check_cubin(lib, arch)
    man = json.loads((art / "manifest.json").read_text())
    assert man["target"]["name"] == target and man["target"]["arch"] == arch
    assert man["cuda_graph"]["capturable"] is True and man["cuda_graph"]["mode"] == "decode-step"
    # sm_90 exports launch with PDL by default (tvm_kernels/pdl.py); the Orin has none
    assert man["target"]["programmatic_dependent_launch"] is (target == "cuda-sm90")
    assert (b"tirx.use_programtic_dependent_launch" in lib.read_bytes()) is (target == "cuda-sm90")
    # the tokens a step graph picks on the device: greedy and sampled
    assert {"argmax", "sample"} <= set(man["functions"])


# ---------------------------------------------------------------------------------------------
# artifact integrity, weights-less export, bad input

@pytest.fixture(scope="module")
def tiny_fp16(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fp16") / "ckpt"
    make_checkpoint("llama", folder, awq=False)
    return folder


def test_manifest_detects_modified_file(tmp_path, exported):
    import shutil

    from runtime.errors import UserError
    from runtime.manifest import Manifest

    art = tmp_path / "art"
    shutil.copytree(exported("llama", False)[1], art)
    Manifest.load(art)
    with open(art / "params.safetensors", "r+b") as f:
        f.seek(-2, os.SEEK_END)
        f.write(b"\x01\x02")
    with pytest.raises(UserError, match="params.safetensors"):
        Manifest.load(art)


def test_weightless_export_lists_params(tmp_path, tiny_fp16):
    from export.exporter import export_config, synthesize_params
    from runtime.manifest import Manifest

    cfg = json.loads((tiny_fp16 / "config.json").read_text())
    art = tmp_path / "art"
    export_config(cfg, "cpu", art, group_size=64, context_length=32)
    man = Manifest.load(art)
    assert not (art / "params.safetensors").exists()
    assert all(p["file"] is None for p in man.params)
    kinds = {p["name"].rsplit(".", 1)[1]: p["dtype"] for p in man.params}
    assert kinds["scales"] == "float16" and kinds["zeros"] == "float16"
    arrays = dict(synthesize_params(man.params, np.random.default_rng(0)))
    for p in man.params:
        assert list(arrays[p["name"]].shape) == p["shape"] and str(arrays[p["name"]].dtype) == p["dtype"]


def _bad(tmp_path, capsys, *args):
    from awq_edge.cli import main

    out = tmp_path / "out"
    rc = main(["export", *map(str, args), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())
    return err


def test_bad_input_one_line_nothing_written(tmp_path, capsys, tiny_fp16):
    import shutil

    assert "unknown target 'nope'" in _bad(tmp_path, capsys, tiny_fp16, "--target", "nope")
    assert "no such folder" in _bad(tmp_path, capsys, tmp_path / "missing", "--target", "cpu")

    no_tok = tmp_path / "no_tok"
    shutil.copytree(tiny_fp16, no_tok)
    (no_tok / "tokenizer.json").unlink()
    assert "tokenizer.json" in _bad(tmp_path, capsys, no_tok, "--target", "cpu")

    gpt2 = tmp_path / "gpt2"
    shutil.copytree(tiny_fp16, gpt2)
    cfg = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    assert "GPT2LMHeadModel" in _bad(tmp_path, capsys, gpt2, "--target", "cpu")

    g16 = tmp_path / "g16"
    shutil.copytree(tiny_fp16, g16)
    (g16 / "config.json").write_text(json.dumps({**cfg, "quantization_config": {
        "quant_method": "awq", "bits": 4, "group_size": 16, "zero_point": True, "version": "gemm"}}))
    assert "group size 16" in _bad(tmp_path, capsys, g16, "--target", "cpu")

    exists = tmp_path / "out"
    exists.mkdir()
    from awq_edge.cli import main

    assert main(["export", str(tiny_fp16), "--target", "cpu", "--out", str(exists)]) == 2
    assert "--force" in capsys.readouterr().err
    exists.rmdir()


def test_missing_cross_compiler_and_nvcc(tmp_path):
    """With PATH emptied of toolchains, CUDA and aarch64 targets fail with one line naming the tool."""
    ckpt = tmp_path / "ckpt"
    make_checkpoint("llama", ckpt, awq=False)
    env = {**os.environ, "PATH": os.path.dirname(sys.executable)}
    for target, tool in (("cpu-aarch64", "aarch64-linux-gnu-g++"), ("cuda-sm90", "nvcc")):
        out = tmp_path / f"out-{target}"
        proc = _cli("export", ckpt, "--target", target, "--out", out, env=env)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and tool in lines[0], proc.stderr
        assert not out.exists()


_FUSED_NORMS = """
import sys
from tvm_kernels.cuda_env import prepare_cuda_build
if sys.argv[1] != "cpu":
    prepare_cuda_build()
from export.kernels import attention_kernels, make_linear_op, make_norm_ops
from export.model import build_module, config_from_hf
from tvm_kernels.targets import get_target
H = int(sys.argv[2])
hf = {"architectures": ["LlamaForCausalLM"], "hidden_size": H, "intermediate_size": 256, "num_hidden_layers": 1,
      "num_attention_heads": H // 64, "num_key_value_heads": H // 192, "vocab_size": 256, "max_position_embeddings": 64}
dt = get_target(sys.argv[1])
with dt.tvm_target():
    module, spec = build_module(config_from_hf(hf, "config.json", group_size=64), make_linear_op("tvm_kernels", dt),
                                make_norm_ops(dt), lambda mode: attention_kernels(dt, mode))
    mod, _ = module.export_tvm(spec=spec)
print(sorted(gv.name_hint for gv in mod.get_global_vars() if "norm" in gv.name_hint))
import json
from tvm import tirx
print(json.dumps({gv.name_hint: [int(d) for d in f.params[-4].shape]
                  for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)
                  and [p.name for p in f.params][-4:-1] == ["pf_w", "pf_s", "pf_z"]}))
"""


@pytest.mark.parametrize("target,hidden,fused", [("cuda-sm90", 576, True), ("cuda-sm90", 2112, False), ("cpu", 576, False)])
def test_decode_fuses_the_norms_for_small_cuda_models(target, hidden, fused):
    # export/model.py Layer.stream: on CUDA, models up to FUSED_NORMS_MAX_HIDDEN decode with each add + RMSNorm
    # inside the GEMVs (the norm-prologue GEMV exists); larger ones and the CPU keep only the norm kernels
    from export.model import FUSED_NORMS_MAX_HIDDEN

    assert 576 <= FUSED_NORMS_MAX_HIDDEN < 2112
    proc = subprocess.run([sys.executable, "-c", _FUSED_NORMS, target, str(hidden)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names, prefetch = proc.stdout.strip().splitlines()[-2:]
    assert ("gemv_w4a16_norm" in names) is fused, names
    assert "add_rms_norm" in names  # prefill's
    # the L2 prefetch chain (sm_90): o_proj's GEMV prefetches gate_up's matrix [2 I, H / 8], gate_up's down's
    # [H, I / 8]; qkv's none (PREFETCH_AFTER_ATTENTION_BYTES), the last down none (nothing after it)
    shapes = sorted(map(tuple, json.loads(prefetch).values()))
    assert shapes == ([] if target == "cpu" else sorted([(512, hidden // 8), (hidden, 256 // 8)])), prefetch
