"""WikiText-2 perplexity with the shared protocol (../shared/README.md).

The whole file is read in text mode (universal newlines turn its CRLF into LF) and tokenized once;
non-overlapping windows of `seqlen` tokens from the start; PPL = exp(mean NLL over every predicted
token), the NLL computed in float32 from the model's logits.
"""
from __future__ import annotations

import math
from pathlib import Path

from awq_edge.errors import UserError


def default_eval_file() -> Path:
    from awq_edge.reference import SHARED_DIR

    return SHARED_DIR / "data" / "wikitext-2-raw" / "wiki.test.raw"


def eval_tokens(tokenizer, path: Path):
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: evaluation text not found")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def perplexity(model, tokens, seqlen: int = 512, windows: int = 40, device: str = "cpu", progress: bool = True) -> dict:
    """{"ppl", "nll", "tokens", "windows", "seqlen"} of `model` on 1-D `tokens`. windows=0: all."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    if seqlen < 2:
        raise UserError(f"--seqlen must be at least 2 (got {seqlen})")
    available = tokens.numel() // seqlen
    if windows < 0:
        raise UserError(f"--windows must be >= 0 (got {windows})")
    n = available if windows == 0 else windows
    if n < 1 or n > available:
        raise UserError(f"the evaluation text has {available} windows of {seqlen} tokens, --windows asks for {n}")
    total_nll, count = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for i in tqdm(range(n), desc="perplexity", unit="window", disable=not progress):
            ids = tokens[i * seqlen : (i + 1) * seqlen].unsqueeze(0).to(device)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            nll = F.cross_entropy(logits, ids[0, 1:], reduction="sum")
            total_nll += float(nll)
            count += seqlen - 1
    mean = total_nll / count
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count, "windows": n, "seqlen": seqlen}
