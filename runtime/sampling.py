"""Token sampling on the host with numpy: greedy, temperature, top-k, top-p, repetition penalty, seed.

The logits of one position (vocab floats) come back from the device each step; at batch 1 and a
vocabulary of ~50k the numpy work is tens of microseconds, far below a decode step on a board. (Plain
greedy decoding from a CUDA step graph skips this: the artifact's argmax picks the token on the GPU with
the same semantics as np.argmax, runtime/cuda_graph.py.)
The order of the filters follows Hugging Face's `generate`: repetition penalty, temperature, top-k,
top-p, then a draw from the softmax.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from runtime.errors import UserError


def repetition_penalty(logits: np.ndarray, previous: Iterable[int], penalty: float) -> np.ndarray:
    """CTRL-style penalty (as in transformers): seen tokens' positive logits / penalty, negative ones * penalty."""
    out = np.array(logits, dtype=np.float32, copy=True)
    if penalty == 1.0:
        return out
    ids = np.unique(np.fromiter(previous, dtype=np.int64))
    if ids.size:
        seen = out[ids]
        out[ids] = np.where(seen > 0, seen / penalty, seen * penalty)
    return out


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits (and any tied with the k-th); the rest become -inf. k <= 0: no filter."""
    if k <= 0 or k >= logits.size:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits < kth, -np.inf, logits).astype(np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - np.max(logits)
    e = np.exp(z)
    return e / e.sum()


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability reaches p; p >= 1: no filter."""
    if p >= 1.0:
        return logits
    probs = softmax(logits)
    order = np.argsort(-probs, kind="stable")
    before = np.cumsum(probs[order]) - probs[order]  # mass of strictly more likely tokens
    keep = np.zeros(logits.size, dtype=bool)
    keep[order[before < p]] = True
    keep[order[0]] = True
    return np.where(keep, logits, -np.inf).astype(np.float32)


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise UserError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise UserError(f"--repetition-penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    def __init__(self, params: SamplingParams | None = None):
        self.params = params or SamplingParams()
        self.rng = np.random.default_rng(self.params.seed)

    def filtered_logits(self, logits: np.ndarray, previous: Iterable[int] = ()) -> np.ndarray:
        """The logits after penalty, temperature, top-k and top-p (what the draw is made from)."""
        p = self.params
        x = repetition_penalty(np.asarray(logits, dtype=np.float32).reshape(-1), previous, p.repetition_penalty)
        if p.greedy:
            return x
        x = x / np.float32(p.temperature)
        x = top_k_filter(x, p.top_k)
        return top_p_filter(x, p.top_p)

    def __call__(self, logits: np.ndarray, previous: Iterable[int] = ()) -> int:
        x = self.filtered_logits(logits, previous)
        if self.params.greedy:
            return int(np.argmax(x))
        probs = softmax(x)
        return int(self.rng.choice(probs.size, p=probs))
