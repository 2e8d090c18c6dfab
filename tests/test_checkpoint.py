"""AutoAWQ GEMM checkpoints: the exact bit layout, save -> load round trips for every family,
config/tokenizer fields that transformers 4.x loaders read, third-party checkpoints, corrupt input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from awq_edge.errors import UserError
from tiny_models import FAMILIES, tiny_model

G = 64
# Written out from the format description (issue 3 / REFERENCE.md), not imported from the code:
# nibble i of each int32, from the least significant, holds output column ORDER[i] of its 8.
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def pack_expected(values: np.ndarray) -> np.ndarray:
    """[rows, N] 4-bit ints -> int32 [rows, N/8], one Python int at a time."""
    rows, n = values.shape
    out = np.zeros((rows, n // 8), dtype=np.int64)
    for r in range(rows):
        for w in range(n // 8):
            word = 0
            for i in range(8):
                word |= int(values[r, 8 * w + ORDER[i]]) << (4 * i)
            out[r, w] = word - (1 << 32) if word >= 1 << 31 else word
    return out.astype(np.int32)


def random_qlinear(out_f: int, in_f: int, gen: torch.Generator, bits: int = 4):
    from awq_edge.quantizer import QuantizedLinear

    top = 1 << bits
    return QuantizedLinear(
        intweight=torch.randint(0, top, (out_f, in_f), generator=gen, dtype=torch.uint8),
        scales=(torch.rand(out_f, in_f // G, generator=gen) * 0.02 + 0.001).half(),
        zeros=torch.randint(0, top, (out_f, in_f // G), generator=gen, dtype=torch.uint8),
    )


def dequant(q) -> torch.Tensor:
    return (q.intweight.float() - q.zeros.float().repeat_interleave(G, 1)) * q.scales.float().repeat_interleave(G, 1)


def fake_quantize(model, adapter, bits: int = 4, seed: int = 0) -> dict:
    """Random integer parts for every quantized linear; the model's weights become their dequant."""
    from awq_edge.adapters import iter_quantized_linears

    gen = torch.Generator().manual_seed(seed)
    qlinears = {}
    for name, linear in iter_quantized_linears(model, adapter):
        q = random_qlinear(linear.out_features, linear.in_features, gen, bits)
        with torch.no_grad():
            linear.weight.copy_(dequant(q))
        qlinears[name] = q
    return qlinears


def save_tiny(family: str, out: Path, bits: int = 4, src_dir=None, **overrides):
    from awq_edge.adapters import get_adapter
    from awq_edge.checkpoint import save_awq_checkpoint
    from awq_edge.quantizer import QuantConfig

    model, config = tiny_model(family, **overrides)
    adapter = get_adapter(config)
    qlinears = fake_quantize(model, adapter, bits)
    cfg = QuantConfig(w_bit=bits, group_size=G, method="rtn")
    save_awq_checkpoint(model, qlinears, cfg, adapter, out, src_dir=src_dir)
    return model, qlinears


def test_pack_matches_format_bit_exact():
    from awq_edge.checkpoint import awq_tensors
    from tvm_kernels.awq_layout import unpack_awq

    gen = torch.Generator().manual_seed(3)
    q = random_qlinear(48, 128, gen)  # out 48, in 128
    t = awq_tensors(q, G)
    assert t["qweight"].dtype == torch.int32 and tuple(t["qweight"].shape) == (128, 6)
    assert t["qzeros"].dtype == torch.int32 and tuple(t["qzeros"].shape) == (2, 6)
    assert t["scales"].dtype == torch.float16 and tuple(t["scales"].shape) == (2, 48)
    np.testing.assert_array_equal(t["qweight"].numpy(), pack_expected(q.intweight.numpy().T))
    np.testing.assert_array_equal(t["qzeros"].numpy(), pack_expected(q.zeros.numpy().T))
    np.testing.assert_array_equal(t["scales"].numpy(), q.scales.numpy().T)
    np.testing.assert_array_equal(unpack_awq(t["qweight"].numpy()), q.intweight.numpy().T)
    # One hand-checked word: columns 0..7 = 1..8 -> nibbles hold 1,3,5,7,2,4,6,8.
    from tvm_kernels.awq_layout import pack_awq

    assert pack_awq(np.arange(1, 9)[None]).view(np.uint32)[0, 0] == 0x86427531


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_round_trip(family, tmp_path):
    from awq_edge import load_awq_model

    model, qlinears = save_tiny(family, tmp_path / "ck")
    loaded = load_awq_model(tmp_path / "ck", dtype=torch.float32)
    want, got = model.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    quantized = {f"{n}.weight" for n in qlinears}
    for name, q in qlinears.items():
        # The loader's (q - z) * s in float32 is the same arithmetic: bit-exact.
        torch.testing.assert_close(got[f"{name}.weight"], dequant(q), rtol=0, atol=0)
    with torch.no_grad():
        for k, v in want.items():
            if k not in quantized:
                v.copy_(v.half().float())  # everything else is stored in FP16
                torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)
    ids = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        out = loaded(input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen2_5_vl"])
def test_vision_tower_stays_fp16_with_legacy_names(family, tmp_path):
    from safetensors import safe_open

    save_tiny(family, tmp_path / "ck")
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as h:
        keys = list(h.keys())
        assert any(k.startswith("visual.") for k in keys)
        assert not any(k.startswith("visual.") and k.endswith("qweight") for k in keys)
        assert all(h.get_tensor(k).dtype in (torch.float16, torch.int32) for k in keys)
    # The layout AutoAWQ / vLLM / transformers 4.x use for Qwen2.5-VL: `model.layers`, not language_model.
    assert "model.layers.0.self_attn.q_proj.qweight" in keys
    qc = json.loads((tmp_path / "ck" / "config.json").read_text())["quantization_config"]
    assert qc["modules_to_not_convert"] == ["visual"]


def read_like_transformers_4x(d: dict, key: str, default):
    """transformers 4.x reads these top-level fields and silently uses its defaults when absent."""
    return d.get(key, default)


@pytest.mark.parametrize("family,theta", [("llama", 12345.0), ("gemma3", 1_000_000.0), ("qwen2_5_vl", 10000.0)])
def test_config_fields_for_4x_loaders(family, theta, tmp_path, smollm2_fp16):
    overrides = {"rope_parameters": {"rope_type": "default", "rope_theta": theta}} if family == "llama" else {}
    save_tiny(family, tmp_path / "ck", bits=3, src_dir=smollm2_fp16, **overrides)
    d = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert d["quantization_config"] == {
        "quant_method": "awq", "bits": 3, "group_size": G, "zero_point": True, "version": "gemm",
        "modules_to_not_convert": ["visual"] if family == "qwen2_5_vl" else [],
    }
    assert d["torch_dtype"] == "float16"
    text = d.get("text_config", d) if family != "qwen2_5_vl" else d  # qwen2.5-vl 4.x reads the top level
    assert read_like_transformers_4x(text, "rope_theta", 10000.0) == theta
    assert "rope_theta" in text
    if family == "gemma3":
        assert text["rope_local_base_freq"] == 10000.0
    if family == "qwen2_5_vl":
        assert d["hidden_size"] == 128 and "text_config" not in d  # the flat layout 4.x reads
        assert d["rope_scaling"]["mrope_section"] == [4, 6, 6]
    tc = json.loads((tmp_path / "ck" / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "<|im_start|>" in tc["chat_template"]
    for name in ("tokenizer.json", "generation_config.json"):
        assert (tmp_path / "ck" / name).is_file()
    # and transformers 5.x still reads everything back
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(tmp_path / "ck").model_type == family.replace("gemma3", "gemma3_text")
    assert AutoTokenizer.from_pretrained(tmp_path / "ck")("Paris")["input_ids"]


def test_third_party_autoawq_checkpoint(tmp_path):
    """A checkpoint written the way AutoAWQ 0.2.x does (4.x config, hand-packed tensors) loads."""
    from safetensors.torch import save_file

    from awq_edge import load_awq_model

    model, config = tiny_model("llama")
    gen = torch.Generator().manual_seed(7)
    sd = {k: v.half() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    expected = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            q = random_qlinear(mod.out_features, mod.in_features, gen)
            del sd[f"{name}.weight"]
            sd[f"{name}.qweight"] = torch.from_numpy(pack_expected(q.intweight.numpy().T))
            sd[f"{name}.qzeros"] = torch.from_numpy(pack_expected(q.zeros.numpy().T))
            sd[f"{name}.scales"] = q.scales.t().contiguous()
            expected[f"{name}.weight"] = dequant(q)
    ck = tmp_path / "third"
    ck.mkdir()
    save_file(sd, str(ck / "model.safetensors"), metadata={"format": "pt"})
    cfg4 = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "vocab_size": config.vocab_size, "rms_norm_eps": config.rms_norm_eps, "rope_theta": 10000.0,
        "rope_scaling": None, "tie_word_embeddings": True, "torch_dtype": "float16", "transformers_version": "4.47.1",
        "max_position_embeddings": 512,
        "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": G, "zero_point": True,
                                "version": "gemm", "modules_to_not_convert": None},
    }
    (ck / "config.json").write_text(json.dumps(cfg4))
    loaded = load_awq_model(ck, dtype=torch.float32)
    got = loaded.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        out = loaded.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


def test_corrupt_checkpoints(tmp_path):
    from safetensors.torch import load_file, save_file

    from awq_edge import load_awq_model

    save_tiny("llama", tmp_path / "ck")
    st = tmp_path / "ck" / "model.safetensors"

    bad = tmp_path / "truncated"
    shutil.copytree(tmp_path / "ck", bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_awq_model(bad)

    sd = load_file(str(st))
    nozeros = tmp_path / "nozeros"
    shutil.copytree(tmp_path / "ck", nozeros)
    save_file({k: v for k, v in sd.items() if k != "model.layers.0.mlp.up_proj.qzeros"}, str(nozeros / "model.safetensors"))
    with pytest.raises(UserError, match="up_proj.qzeros"):
        load_awq_model(nozeros)

    shapes = tmp_path / "shapes"
    shutil.copytree(tmp_path / "ck", shapes)
    sd2 = dict(sd)
    sd2["model.layers.1.self_attn.o_proj.scales"] = sd2["model.layers.1.self_attn.o_proj.scales"][:1].contiguous()
    save_file(sd2, str(shapes / "model.safetensors"))
    with pytest.raises(UserError, match="o_proj: shapes"):
        load_awq_model(shapes)

    missing = tmp_path / "missing"
    shutil.copytree(tmp_path / "ck", missing)
    save_file({k: v for k, v in sd.items() if not k.startswith("model.layers.1.mlp.down_proj")}, str(missing / "model.safetensors"))
    with pytest.raises(UserError, match="lacks"):
        load_awq_model(missing)

    noq = tmp_path / "noq"
    shutil.copytree(tmp_path / "ck", noq)
    d = json.loads((noq / "config.json").read_text())
    d["quantization_config"]["version"] = "gemv"
    (noq / "config.json").write_text(json.dumps(d))
    with pytest.raises(UserError, match="gemv"):
        load_awq_model(noq)


def test_refuses_non_empty_output(tmp_path):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="--force"):
        save_tiny("llama", out)
    assert (out / "keep.txt").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp folder left behind


# --------------------------------------------------------------------------- a real transformers 4.x
TF4_SPEC = ("transformers==4.51.3", "tokenizers==0.21.1", "huggingface_hub==0.30.2")
TF4_DIR = Path(__file__).resolve().parent.parent / ".cache" / "transformers-4.51.3"
TF4_SCRIPT = r"""
import json, sys, torch, transformers
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer
for path in sys.argv[1:]:
    c = AutoConfig.from_pretrained(path)
    text = c.get_text_config()
    with torch.device("meta"):
        m = getattr(transformers, c.architectures[0])._from_config(c)
    want = set(m.state_dict())
    with safe_open(path + "/model.safetensors", "pt") as h:
        have = {k.replace(".qweight", ".weight") for k in h.keys() if not k.endswith((".qzeros", ".scales"))}
    tok = AutoTokenizer.from_pretrained(path)
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
                                   add_generation_prompt=True)
    print(json.dumps({"version": transformers.__version__, "rope_theta": text.rope_theta,
                      "torch_dtype": str(c.torch_dtype), "bits": c.quantization_config["bits"],
                      "missing": sorted(want - have), "unexpected": sorted(have - want),
                      "tokenizer": type(tok).__name__, "ids": tok("The capital of France")["input_ids"], "chat": chat}))
"""


@pytest.fixture(scope="module")
def transformers_4x() -> Path:
    """transformers 4.51.3 in a side folder (PYTHONPATH), the version vLLM/AutoAWQ users pin."""
    import subprocess
    import sys

    if not (TF4_DIR / "transformers").is_dir():
        tmp = TF4_DIR.with_name(TF4_DIR.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--retries", "1", "--timeout", "15",
                            "--target", str(tmp), *TF4_SPEC],
                           check=True, capture_output=True, timeout=240)
        except (subprocess.SubprocessError, OSError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            pytest.skip(f"cannot install {TF4_SPEC[0]} here ({type(e).__name__})")
        tmp.rename(TF4_DIR)
    return TF4_DIR


def test_checkpoint_reads_under_transformers_4x(tmp_path, smollm2_fp16, transformers_4x):
    import os
    import subprocess
    import sys

    from transformers import AutoTokenizer

    cases = {"llama": 12345.0, "gemma3": 1_000_000.0, "qwen2_5_vl": 10000.0}
    for family, theta in cases.items():
        overrides = {"rope_parameters": {"rope_type": "default", "rope_theta": theta}} if family == "llama" else {}
        save_tiny(family, tmp_path / family, src_dir=smollm2_fp16, **overrides)
    env = dict(os.environ, PYTHONPATH=str(transformers_4x), HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-c", TF4_SCRIPT, *(str(tmp_path / f) for f in cases)], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    results = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(cases)
    tok5 = AutoTokenizer.from_pretrained(tmp_path / "llama")
    chat5 = tok5.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    for (family, theta), got in zip(cases.items(), results):
        assert got["version"] == "4.51.3"
        assert got["rope_theta"] == theta, family  # 4.x falls back to 10000 when the field is missing
        assert got["torch_dtype"] == "torch.float16" and got["bits"] == 4
        # Every tensor name is one 4.x expects (a tied lm_head is the only one absent, on purpose).
        assert got["unexpected"] == [] and set(got["missing"]) <= {"lm_head.weight"}, family
        assert got["tokenizer"] == "PreTrainedTokenizerFast"
        assert got["ids"] == tok5("The capital of France")["input_ids"]
        assert got["chat"] == chat5
