"""`awq-edge export --lm-head int8` on tiny models (cpu): the artifact, run by the runtime alone, against
transformers float32 with the same INT8 lm_head (dequantized) within test_export's tolerance and with
identical greedy tokens; against the unquantized head within the same tolerance; tied (Llama: the
embedding lookup reads the same INT8 table) and untied (Qwen2: the embedding stays FP16)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_export import (DECODE_STEPS, PROMPT, assert_close, assert_matches_transformers,  # noqa: E402
                         make_checkpoint, reference_logits, run_artifact)

pytest.importorskip("tvm")
torch = pytest.importorskip("torch")


def _int8_head_model(model, group_size: int):
    """A copy of `model` whose lm_head (tied: also the embedding) holds the INT8-dequantized weights."""
    import copy

    from tvm_kernels.gemv_w8a16 import dequantize, quantize

    model = copy.deepcopy(model)
    with torch.no_grad():
        head = model.get_output_embeddings()
        q, s = quantize(head.weight.numpy(), group_size)
        head.weight.copy_(torch.from_numpy(dequantize(q, s, group_size)))
    return model


@pytest.mark.parametrize("family,awq", [("llama", True), ("qwen2", False)], ids=["llama-awq-tied", "qwen2-fp16-untied"])
def test_int8_lm_head_matches_transformers(tmp_path, capsys, family, awq):
    from awq_edge.cli import main
    from runtime.manifest import Manifest

    model = make_checkpoint(family, tmp_path / "ckpt", awq)
    art = tmp_path / "art"
    assert main(["export", str(tmp_path / "ckpt"), "--target", "cpu", "--out", str(art), "--context-length", "64",
                 "--prefill-chunk", "8", "--lm-head", "int8"]) == 0
    man = Manifest.load(art)
    G = man.model["lm_head_group_size"]
    assert man.model["lm_head"] == "int8" and G == 32 and man.created_by["lm_head"] == "int8"
    params = {p["name"]: p for p in man.params}
    tied = model.config.get_text_config().tie_word_embeddings
    table = "model.embed_tokens" if tied else "lm_head"
    V, H = model.get_output_embeddings().weight.shape
    assert params[f"{table}.weight"]["dtype"] == "int8" and params[f"{table}.weight"]["shape"] == [V, H]
    assert params[f"{table}.scales"]["dtype"] == "float16" and params[f"{table}.scales"]["shape"] == [V, H // G]
    if not tied:
        assert params["model.embed_tokens.weight"]["dtype"] == "float16"

    assert_matches_transformers(_int8_head_model(model, G), art, PROMPT, DECODE_STEPS, tmp_path,
                                f"{family} int8 lm_head")
    # and the quantization itself is small against the FP16 head
    out = run_artifact(art, PROMPT, 0, tmp_path)
    assert_close(out["prefill"], reference_logits(model, PROMPT), f"{family} int8 lm_head vs the fp16 head")
