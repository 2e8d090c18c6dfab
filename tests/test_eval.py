"""Perplexity: our windowed evaluation agrees with a plain transformers loop on the same weights."""
from __future__ import annotations

import json
import math

import pytest
import torch

from awq_edge.errors import UserError
from tiny_models import tiny_model


def plain_loop_ppl(model, tokens: torch.Tensor, seqlen: int, windows: int) -> float:
    """The textbook evaluation: transformers' own shifted cross-entropy per window."""
    losses = []
    with torch.no_grad():
        for i in range(windows):
            ids = tokens[i * seqlen : (i + 1) * seqlen][None]
            losses.append(model(input_ids=ids, labels=ids).loss.double())
    return math.exp(torch.stack(losses).mean().item())


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_perplexity_matches_plain_loop(family):
    from awq_edge.evaluate import perplexity

    model, _ = tiny_model(family)
    tokens = torch.randint(0, 256, (3 * 48 + 7,), generator=torch.Generator().manual_seed(0))
    got = perplexity(model, tokens, seqlen=48, windows=2, progress=False)
    assert got["windows"] == 2 and got["tokens"] == 2 * 47
    assert got["ppl"] == pytest.approx(plain_loop_ppl(model, tokens, 48, 2), rel=1e-5)
    every = perplexity(model, tokens, seqlen=48, windows=0, progress=False)
    assert every["windows"] == 3
    assert every["ppl"] == pytest.approx(plain_loop_ppl(model, tokens, 48, 3), rel=1e-5)
    with pytest.raises(UserError, match="--windows asks for 4"):
        perplexity(model, tokens, seqlen=48, windows=4, progress=False)


def test_eval_text_read_with_universal_newlines(tmp_path, smollm2_fp16):
    from transformers import AutoTokenizer

    from awq_edge.evaluate import eval_tokens

    tok = AutoTokenizer.from_pretrained(smollm2_fp16)
    f = tmp_path / "crlf.raw"
    f.write_bytes(b" = Title = \r\n\r\n Some text here .\r\n")
    assert eval_tokens(tok, f).tolist() == tok(" = Title = \n\n Some text here .\n")["input_ids"]
    with pytest.raises(UserError, match="not found"):
        eval_tokens(tok, tmp_path / "absent.raw")


@pytest.mark.slow
def test_smollm2_eval_cli_matches_plain_transformers(tmp_path, smollm2_fp16, shared_dir):
    """The real model, tokenizer and WikiText-2 file: `awq-edge eval` == a plain loop (1 window of 512)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from awq_edge.cli import main

    out = tmp_path / "ppl.json"
    assert main(["eval", str(smollm2_fp16), "--ppl", "--windows", "1", "--device", "cpu", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["windows"] == 1 and got["seqlen"] == 512 and got["dtype"] == "float32"

    tok = AutoTokenizer.from_pretrained(smollm2_fp16)
    text = (shared_dir / "data" / "wikitext-2-raw" / "wiki.test.raw").read_text()
    tokens = torch.tensor(tok(text)["input_ids"])
    model = AutoModelForCausalLM.from_pretrained(smollm2_fp16, dtype=torch.float32).eval()
    assert got["ppl"] == pytest.approx(plain_loop_ppl(model, tokens, 512, 1), rel=1e-4)
