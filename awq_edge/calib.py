"""Calibration tokens for AWQ: JSONL ("text" field) or plain text -> LongTensor [n_samples, seqlen].

The default is the published protocol: documents tokenized in file order without special tokens,
concatenated, cut into consecutive seqlen blocks, the first n kept. With a seed the blocks are drawn
at random (reproducibly) from the whole file instead.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from awq_edge.errors import UserError


def iter_documents(path: Path) -> Iterator[str]:
    """Documents of a calibration file: one per JSONL line ("text"), or the whole plain-text file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: calibration file not found (--calib expects a .jsonl with a \"text\" field or a plain text file)")
    if path.suffix.lower() in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UserError(f"{path}:{lineno}: expected a JSON object with a \"text\" string") from None
                if not isinstance(text, str):
                    raise UserError(f"{path}:{lineno}: \"text\" must be a string")
                if text:
                    yield text
    else:
        text = path.read_text(encoding="utf-8", errors="replace")
        if text:
            yield text


def load_calibration(path, tokenizer, n_samples: int = 128, seqlen: int = 512, seed: int | None = None):
    import torch

    if n_samples < 1 or seqlen < 1:
        raise UserError(f"--calib-samples and --calib-seqlen must be positive (got {n_samples} x {seqlen})")
    need = n_samples * seqlen
    tokens: list[int] = []
    for doc in iter_documents(path):
        tokens.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if seed is None and len(tokens) >= need:
            break  # file order: the rest of the file cannot change the first n blocks
    n_blocks = len(tokens) // seqlen
    if n_blocks < n_samples:
        raise UserError(
            f"{path}: too little calibration text: {len(tokens)} tokens make {n_blocks} blocks of {seqlen}, "
            f"--calib-samples asks for {n_samples}"
        )
    blocks = torch.tensor(tokens[: n_blocks * seqlen], dtype=torch.long).view(n_blocks, seqlen)
    if seed is None:
        return blocks[:n_samples].clone()
    order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed))
    return blocks[order[:n_samples]].clone()
