"""Export of Gemma3 (Gemma3ForCausalLM, and the language model of Gemma3ForConditionalGeneration) and
OPT, and weights in shards: tiny random models -> cpu artifact -> runtime alone -> logits against
transformers (float32) on the same FP16 (or dequantized RTN W4) weights.

Tolerance as tests/test_export.py: 0.02 + 2% of the largest |logit|; greedy tokens identical. The
prompt (40 tokens, prefilled in chunks of 8) is longer than the tiny Gemma3's sliding window (16), so
its local layers must attend over the window only; test_window_matters checks that ignoring the
window would miss that tolerance by far.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_export import (assert_close, assert_matches_transformers, make_checkpoint, reference_logits,  # noqa: E402
                         save_checkpoint)

PROMPT = [int(t) for t in np.random.default_rng(1).integers(3, 250, 40)]
DECODE_STEPS = 6
CHUNK = 8
WINDOW = 16  # tests/tiny_models.py: the tiny Gemma3's sliding_window
SHARD_BYTES = 48 * 1024  # forces several shards on the tiny AWQ Gemma3 (~240 KB of weights)


def _tiny_gemma3_multimodal():
    """Gemma3ForConditionalGeneration around the tiny Gemma3 text model (vision tower unused)."""
    import torch
    import transformers as tf

    from tiny_models import _randomize_norms, tiny_config

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)
    cfg = tf.Gemma3Config(text_config=tiny_config("gemma3").to_dict(), vision_config=vision, mm_tokens_per_image=4,
                          image_token_index=255, boi_token_index=254, eoi_token_index=253)
    torch.manual_seed(0)
    model = tf.Gemma3ForConditionalGeneration(cfg).float()
    _randomize_norms(model, torch.Generator().manual_seed(1))
    return model.eval(), model.config


CASES = [("gemma3", False), ("gemma3", True), ("gemma3_mm", True), ("opt", False), ("opt", True)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from export.exporter import export_checkpoint

    cache = {}

    def get(family: str, awq: bool):
        if (family, awq) not in cache:
            root = tmp_path_factory.mktemp(f"{family}-{'awq' if awq else 'fp16'}")
            if family == "gemma3_mm":
                model = save_checkpoint(*_tiny_gemma3_multimodal(), root / "ckpt", awq)
            else:
                model = make_checkpoint(family, root / "ckpt", awq)
            # the AWQ Gemma3 artifact is also the sharding test's
            shard = SHARD_BYTES if (family, awq) == ("gemma3", True) else 1 << 30
            summary = export_checkpoint(root / "ckpt", "cpu", root / "art", context_length=64, prefill_chunk=CHUNK,
                                        shard_bytes=shard)
            assert summary["quantized"] is awq
            cache[family, awq] = model, root / "ckpt", root / "art"
        return cache[family, awq]

    return get


@pytest.mark.parametrize("family,awq", CASES, ids=[f"{f}-{'awq' if a else 'fp16'}" for f, a in CASES])
def test_export_matches_transformers(tmp_path, exported, family, awq):
    from runtime.manifest import Manifest

    model, _, art = exported(family, awq)
    man = Manifest.load(art)
    if family.startswith("gemma3"):
        assert man.model["layer_types"] == ["sliding_attention", "full_attention"]
        assert man.kv_cache["layer_sliding_window"] == WINDOW and man.kv_cache["sliding_layers"] == [0]
        assert man.model["rope_local_theta"] == 10000.0 and man.model["rope_theta"] == 1e6
    else:
        assert man.kv_cache["layer_sliding_window"] == 0
        pos = next(p for p in man.params if p["name"] == "model.embed_positions.weight")
        assert pos["shape"] == [512 + 2, 128]  # max_position_embeddings + OPT's offset 2
    assert_matches_transformers(model, art, PROMPT, DECODE_STEPS, tmp_path,
                                f"{family} ({len(PROMPT)} tokens, prefill in chunks of {CHUNK})")


def test_window_matters():
    """Without its sliding window the tiny Gemma3 gives logits far outside the tolerance above, so the
    match there shows the local layers attend over the window only."""
    from tiny_models import tiny_model

    model, _ = tiny_model("gemma3")
    ref = reference_logits(model, PROMPT)
    wide, _ = tiny_model("gemma3", sliding_window=len(PROMPT) + 1)
    tol = 0.02 + 0.02 * float(np.abs(ref).max())
    assert float(np.abs(reference_logits(wide, PROMPT) - ref).max()) > 5 * tol


def test_prefill_chunk_fits_the_window():
    """A prefill chunk attends to itself without the window (TVM's ragged kernel), and a window-sized one
    leaves its last query no cached token (NaN from TVM's paged kernel): Gemma3 chunks stay below the
    window by default, and a larger --prefill-chunk is refused in one line."""
    from export.errors import UserError
    from export.model import config_from_hf
    from tiny_models import tiny_config

    hf = tiny_config("gemma3").to_dict()
    hf["architectures"] = ["Gemma3ForCausalLM"]
    assert config_from_hf(hf, "config.json", group_size=None, context_length=64).prefill_chunk_size == WINDOW - 1
    with pytest.raises(UserError, match="sliding window"):
        config_from_hf(hf, "config.json", group_size=None, context_length=64, prefill_chunk_size=WINDOW)
    # a window as wide as the context narrows nothing
    assert config_from_hf(hf, "config.json", group_size=None, context_length=WINDOW).prefill_chunk_size == WINDOW


def test_default_chunk_matches_transformers(tmp_path):
    """The default chunk (window - 1, the largest allowed) over the 40-token prompt still matches."""
    from export.exporter import export_checkpoint
    from runtime.manifest import Manifest

    model = make_checkpoint("gemma3", tmp_path / "ckpt", False)
    export_checkpoint(tmp_path / "ckpt", "cpu", tmp_path / "art", context_length=64)
    assert Manifest.load(tmp_path / "art").model["prefill_chunk_size"] == WINDOW - 1
    assert_matches_transformers(model, tmp_path / "art", PROMPT, DECODE_STEPS, tmp_path,
                                f"gemma3 ({len(PROMPT)} tokens, default chunks of {WINDOW - 1})")


def test_sharded_params_roundtrip(exported):
    """Small shards: names params-0000i-of-0000N, each within the limit (or one tensor alone), every param
    in exactly one, bytes equal to what the exporter produced from the checkpoint; the Engine loads them."""
    from export.exporter import _Params
    from export.model import config_from_hf
    from export.weights import LinearSource, SafetensorsFolder, quant_config, read_config
    from runtime.engine import Engine
    from runtime.manifest import Manifest
    from runtime.weights import ParamReader, read_header

    model, ckpt, art = exported("gemma3", True)
    man = Manifest.load(art)
    files = man.param_files
    assert len(files) >= 3 and not (art / "params.safetensors").exists()
    assert all(re.fullmatch(rf"params-{i:05d}-of-{len(files):05d}\.safetensors", f) for i, f in enumerate(files, 1))
    assert sorted(files) == sorted(f for f in man.files if f.endswith(".safetensors"))  # all hashed
    for f in files:
        header, _ = read_header(art / f)
        data = sum(e - b for b, e in (info["data_offsets"] for info in header.values()))
        assert data <= SHARD_BYTES or len(header) == 1
        assert set(header) == {p["name"] for p in man.params if p["file"] == f}

    hf = read_config(ckpt)
    quant = quant_config(hf, ckpt)
    cfg = config_from_hf(hf, "config.json", group_size=quant.group_size, context_length=64)
    source = _Params(cfg, hf["architectures"][0], LinearSource(SafetensorsFolder(ckpt), quant))
    reader = ParamReader(art)
    for p in man.params:
        np.testing.assert_array_equal(reader.get(p), source.get(p["name"]), err_msg=p["name"])

    eng = Engine(art)
    got = eng.prefill_logits(PROMPT)
    ref = reference_logits(model, PROMPT + [int(got[-1].argmax())])
    assert_close(got, ref[:len(PROMPT)], "Engine prefill_logits from shards")
    eng.prefill(PROMPT)
    assert_close(eng.decode(int(got[-1].argmax()))[None], ref[len(PROMPT):], "Engine decode from shards")
    # a prompt that diverges at token 30: the cache pops back to the common prefix and goes on from there
    other = PROMPT[:30] + [7, 8, 9]
    assert_close(eng.prefill(other)[None], reference_logits(model, other)[-1:], "Engine prefill after popn")
    assert eng.last_prefilled == 3


@pytest.mark.parametrize("arch,change,message", [
    ("OPTForCausalLM", {"do_layer_norm_before": False}, "do_layer_norm_before=False"),
    ("OPTForCausalLM", {"word_embed_proj_dim": 64}, "word_embed_proj_dim 64 differs from hidden_size 128"),
    ("OPTForCausalLM", {"activation_function": "gelu_new"}, "hidden_act 'gelu_new'"),
    ("Gemma3ForCausalLM", {"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0"),
    ("Gemma3ForCausalLM", {"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 2.0}}},
     "rope scaling 'yarn'"),
])
def test_unsupported_configs_one_line(arch, change, message):
    from export.errors import UserError
    from export.model import config_from_hf
    from tiny_models import tiny_config

    hf = {**tiny_config("opt" if arch.startswith("OPT") else "gemma3").to_dict(), "architectures": [arch], **change}
    with pytest.raises(UserError, match=re.escape(message)):
        config_from_hf(hf, "config.json", group_size=None)


def test_unsupported_family_config_cli(tmp_path, capsys, exported):
    """Through the CLI: one line, nothing written."""
    import shutil

    from awq_edge.cli import main

    ckpt = tmp_path / "ckpt"
    shutil.copytree(exported("opt", False)[1], ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "do_layer_norm_before": False}))
    out = tmp_path / "out"
    assert main(["export", str(ckpt), "--target", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "do_layer_norm_before" in err and "Traceback" not in err
    assert not out.exists()
