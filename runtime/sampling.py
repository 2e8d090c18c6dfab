"""Token sampling on the host with numpy: greedy, temperature, top-k, top-p, repetition penalty, seed.

The logits of one position (vocab floats) come back from the device each step. The order of the filters
follows Hugging Face's `generate`: repetition penalty, temperature, top-k, top-p, then a draw from the
softmax. `top_k_filter` / `top_p_filter` / `softmax` spell the rules out over the whole vocabulary (the
reference); `Sampler` applies the same rules to the few tokens that can survive them, because sorting and
normalizing ~50k floats every step cost 0.8-5 ms of host time, longer than a decode step on the GPU
(benchmarks/sampling.py). Decoding from a CUDA step graph leaves the host after the first token: the
artifact's argmax picks greedy tokens on the GPU with np.argmax's semantics, and its `sample` applies these
rules there, penalty included (tvm_kernels/sample.py, runtime/cuda_graph.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from runtime.errors import UserError


def repetition_penalty(logits: np.ndarray, previous: Iterable[int], penalty: float,
                       out: np.ndarray | None = None) -> np.ndarray:
    """CTRL-style penalty (as in transformers): seen tokens' positive logits / penalty, negative ones * penalty.
    out: a float32 array of the logits' size to write into (default: a new one)."""
    if out is None:
        out = np.array(logits, dtype=np.float32, copy=True)
    else:
        np.copyto(out, logits)
    if penalty == 1.0:
        return out
    ids = np.fromiter(previous, dtype=np.int64)  # repeats are harmless: each writes the same value
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


NUCLEUS_SPAN = 8.0  # top-p first sorts the tokens within this of the best logit (e^-8 ~ 3e-4)...
NUCLEUS_SORT = 1024  # ...if they are at most this many and hold top_p; else it finds the cut among
NUCLEUS_BUCKETS = 1024  # this many buckets of logit value
DRAW_BLOCK = 256  # a draw sums blocks of this many weights, then scans one block (np.cumsum is serial)


def top_k_ids(logits: np.ndarray, k: int) -> np.ndarray | None:
    """top_k_filter's survivors, ascending (the k largest and any tied with the k-th); None: all of them."""
    if k <= 0 or k >= logits.size:
        return None
    return np.flatnonzero(logits >= np.partition(logits, -k)[-k])


def nucleus(logits: np.ndarray, p: float, out: np.ndarray | None = None) -> tuple[np.ndarray | None, np.ndarray]:
    """top_p_filter's survivors among `logits` (positions, ascending; None: all) and their weights
    (probabilities times a common factor; all of them for None).

    Only tokens near the cut are sorted. Tokens with larger logits come first in the reference's order, so
    a token's "mass before" is the mass of the larger logits plus that of its equals ahead of it (lower
    ids). A peaked distribution reaches p within NUCLEUS_SPAN of the best logit: those few are sorted. A
    flat one (a random model, a high temperature) may need thousands: buckets of logit value then locate
    the cut, tokens in buckets above it are all kept, below it all dropped, and only the buckets at the
    cut are sorted. Weights and sums are float64 as in the reference, up to the order of summation (the
    margins cover that). out: a float64 scratch array of the logits' size (a sampler reuses one: a fresh
    400 KB array every step costs more in page faults than the arithmetic).
    """
    top = np.max(logits)
    e = np.subtract(logits, top, out=out, dtype=np.float64)
    np.exp(e, out=e)
    if p >= 1.0:
        return None, e
    total = e.sum()
    cand = np.flatnonzero(logits >= top - NUCLEUS_SPAN)
    if cand.size <= NUCLEUS_SORT and e[cand].sum() >= (p + 1e-9) * total:
        mask, before = np.zeros(logits.size, dtype=bool), 0.0
    else:
        lowest = np.min(np.where(np.isfinite(logits), logits, top))  # -inf logits go to the last bucket
        scale = np.float32(NUCLEUS_BUCKETS / max(float(top - lowest), 1e-30))
        bucket = np.minimum((top - logits) * scale, NUCLEUS_BUCKETS - 1).astype(np.int32)
        mass = np.cumsum(np.bincount(bucket, weights=e, minlength=NUCLEUS_BUCKETS))
        first = int(np.searchsorted(mass, (p - 1e-9) * total))  # buckets before it hold less than p: kept
        last = int(np.searchsorted(mass, (p + 1e-9) * total))  # buckets after it: mass before >= p, dropped
        mask, before = bucket < first, (mass[first - 1] if first else 0.0)
        cand = np.flatnonzero((bucket >= first) & (bucket <= last))
    w = e[cand]
    order = np.argsort(-w, kind="stable")
    mask[cand[order[before + np.cumsum(w[order]) - w[order] < p * total]]] = True
    kept = np.flatnonzero(mask)
    return kept, e[kept]


def draw(weights: np.ndarray, u: float) -> int:
    """The index where the cumulative sum of `weights` (>= 0, not all 0) first exceeds u * their total:
    a draw with probabilities proportional to the weights, for u uniform in [0, 1)."""
    n, base = weights.size, 0
    full = n // DRAW_BLOCK
    if full > 1:  # the block, then the position inside it
        sums = weights[:full * DRAW_BLOCK].reshape(full, DRAW_BLOCK).sum(axis=1)
        if n > full * DRAW_BLOCK:
            sums = np.append(sums, weights[full * DRAW_BLOCK:].sum())
        cum = np.cumsum(sums)
        t = u * cum[-1]
        b = min(int(np.searchsorted(cum, t, side="right")), cum.size - 1)
        base, t = b * DRAW_BLOCK, t - (cum[b - 1] if b else 0.0)
        weights = weights[base:base + DRAW_BLOCK]
    else:
        t = u * weights.sum()
    cdf = np.cumsum(weights)
    j = int(np.searchsorted(cdf, t, side="right"))
    if j >= cdf.size or weights[j] == 0:  # u * total rounded up to the total: the last token with weight
        j = int(np.flatnonzero(weights)[-1])
    return base + j


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
        self._x: np.ndarray | None = None
        self._w: np.ndarray | None = None

    def survivors(self, logits: np.ndarray, previous: Iterable[int] = ()) -> tuple[np.ndarray | None, np.ndarray]:
        """What the draw picks from after penalty, temperature, top-k and top-p: the tokens (ascending; None:
        the whole vocabulary) and their probabilities up to a common factor."""
        p = self.params
        logits = np.asarray(logits, dtype=np.float32).reshape(-1)
        if self._x is None or self._x.size != logits.size:  # scratch reused every step
            self._x, self._w = np.empty(logits.size, np.float32), np.empty(logits.size, np.float64)
        x = repetition_penalty(logits, previous, p.repetition_penalty, out=self._x)
        x /= np.float32(p.temperature or 1.0)
        ids = top_k_ids(x, p.top_k)
        kept, probs = nucleus(x, p.top_p, self._w) if ids is None else nucleus(x[ids], p.top_p)
        if kept is None:
            return ids, probs
        return (kept if ids is None else ids[kept]), probs

    def filtered_logits(self, logits: np.ndarray, previous: Iterable[int] = ()) -> np.ndarray:
        """The logits after penalty, temperature, top-k and top-p (-inf where filtered out)."""
        p = self.params
        if p.greedy:
            return repetition_penalty(np.asarray(logits, dtype=np.float32).reshape(-1), previous, p.repetition_penalty)
        ids, _ = self.survivors(logits, previous)
        x = self._x.copy()  # survivors' scratch: the logits after the penalty and the temperature
        if ids is None:
            return x
        out = np.full_like(x, -np.inf)
        out[ids] = x[ids]
        return out

    def __call__(self, logits: np.ndarray, previous: Iterable[int] = ()) -> int:
        if self.params.greedy:
            return int(np.argmax(self.filtered_logits(logits, previous)))
        ids, probs = self.survivors(logits, previous)
        j = draw(probs, self.rng.random())
        return j if ids is None else int(ids[j])
