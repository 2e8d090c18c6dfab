"""runtime.sampling against expectations computed independently with numpy (sorting, explicit loops)."""
import numpy as np
import pytest

from runtime.errors import UserError
from runtime.sampling import Sampler, SamplingParams, repetition_penalty, softmax, top_k_filter, top_p_filter


def _logits(n=50, seed=0):
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32) * 3


@pytest.mark.parametrize("k", [1, 5, 17])
def test_top_k_keeps_the_k_largest(k):
    x = _logits()
    out = top_k_filter(x, k)
    expect = set(np.argsort(-x)[:k].tolist())
    kept = set(np.flatnonzero(np.isfinite(out)).tolist())
    assert kept == expect
    np.testing.assert_array_equal(out[list(expect)], x[list(expect)])


def test_top_k_off_and_ties():
    x = _logits()
    np.testing.assert_array_equal(top_k_filter(x, 0), x)
    tied = np.array([1.0, 3.0, 3.0, 2.0], np.float32)
    assert np.isfinite(top_k_filter(tied, 1)).tolist() == [False, True, True, False]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.999])
def test_top_p_is_the_smallest_set_reaching_p(p):
    x = _logits(seed=3)
    probs = np.exp(x.astype(np.float64) - x.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    expect, mass = [], 0.0
    for i in order:  # add tokens until the kept mass reaches p
        expect.append(int(i))
        mass += probs[i]
        if mass >= p:
            break
    kept = np.flatnonzero(np.isfinite(top_p_filter(x, p))).tolist()
    assert sorted(kept) == sorted(expect)


def test_top_p_always_keeps_the_best():
    x = np.array([10.0, 0.0, 0.0], np.float32)
    assert np.isfinite(top_p_filter(x, 0.01)).tolist() == [True, False, False]


def test_repetition_penalty_matches_transformers_rule():
    x = np.array([2.0, -1.0, 0.5, -3.0, 1.0], np.float32)
    out = repetition_penalty(x, [0, 1, 1, 3], 1.5)
    np.testing.assert_allclose(out, [2.0 / 1.5, -1.5, 0.5, -4.5, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(repetition_penalty(x, [0, 1], 1.0), x)


def test_repetition_penalty_equals_transformers_processor():
    torch = pytest.importorskip("torch")
    from transformers import RepetitionPenaltyLogitsProcessor

    x = _logits(seed=5)
    prev = [3, 7, 7, 11, 40]
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prev]), torch.tensor(x)[None]).numpy()[0]
    np.testing.assert_allclose(repetition_penalty(x, prev, 1.3), ref, rtol=1e-6)


def test_greedy_is_argmax_and_penalty_applies():
    x = np.array([0.0, 5.0, 4.9], np.float32)
    assert Sampler()(x) == 1
    assert Sampler(SamplingParams(repetition_penalty=2.0))(x, previous=[1]) == 2


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    x = np.log(np.array([0.5, 0.3, 0.2], np.float32))
    a = Sampler(SamplingParams(temperature=1.0, seed=123))
    b = Sampler(SamplingParams(temperature=1.0, seed=123))
    draws_a = [a(x) for _ in range(4000)]
    assert draws_a == [b(x) for _ in range(4000)]
    freq = np.bincount(draws_a, minlength=3) / len(draws_a)
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2], atol=0.03)
    c = Sampler(SamplingParams(temperature=1.0, seed=124))
    assert [c(x) for _ in range(50)] != draws_a[:50]


def test_temperature_and_filters_compose():
    x = _logits(seed=9)
    s = Sampler(SamplingParams(temperature=0.5, top_k=10, top_p=0.8, seed=0))
    f = s.filtered_logits(x)
    expect = top_p_filter(top_k_filter(x / 0.5, 10), 0.8)
    np.testing.assert_allclose(f, expect, rtol=1e-6)
    kept = set(np.flatnonzero(np.isfinite(f)).tolist())
    assert all(s(x) in kept for _ in range(200))
    np.testing.assert_allclose(softmax(f)[list(kept)].sum(), 1.0, rtol=1e-9)


def test_bad_parameters_are_user_errors():
    for kw in ({"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2}, {"repetition_penalty": 0}):
        with pytest.raises(UserError):
            SamplingParams(**kw)


def _reference_survivors(x, temperature, top_k, top_p):
    """The whole-vocabulary rules: which tokens a draw may pick and with what probability."""
    f = top_p_filter(top_k_filter(x / np.float32(temperature), top_k), top_p)
    kept = np.flatnonzero(np.isfinite(f))
    return kept, softmax(f)[kept]


@pytest.mark.parametrize("vocab", [50, 49152])
@pytest.mark.parametrize("scale", [0.3, 3.0, 30.0])  # flat (nucleus of thousands) to peaked (one token)
@pytest.mark.parametrize("top_k,top_p", [(0, 0.5), (0, 0.9), (0, 0.999), (40, 0.95), (50, 1.0), (0, 1.0)])
def test_sampler_survivors_equal_the_whole_vocabulary_rules(vocab, scale, top_k, top_p):
    rng = np.random.default_rng(vocab + int(scale * 10) + top_k)
    x = (rng.standard_normal(vocab) * scale).astype(np.float32)
    x[rng.integers(0, vocab, 8)] = x.max()  # ties at the top
    s = Sampler(SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p))
    ids, probs = s.survivors(x)
    kept, ref = _reference_survivors(x, 0.7, top_k, top_p)
    np.testing.assert_array_equal(np.arange(vocab) if ids is None else ids, kept)
    # the draw weighs survivors by their float32 exp (the kept set itself is decided in float64)
    np.testing.assert_allclose(probs / probs.sum(dtype=np.float64), ref, rtol=2e-5, atol=1e-15)
    f = s.filtered_logits(x)
    np.testing.assert_array_equal(np.flatnonzero(np.isfinite(f)), kept)


@pytest.mark.parametrize("n", [3, 256, 1000, 49152])
def test_draw_follows_the_weights(n):
    from runtime.sampling import draw

    rng = np.random.default_rng(n)
    w = rng.random(n) ** 8  # uneven
    w[rng.integers(0, n, n // 3 + 1)] = 0.0  # zero weights are never drawn
    picks = np.array([draw(w, u) for u in rng.random(20000)])
    assert w[picks].min() > 0
    # the inverse CDF, exactly, at a few points: the first index whose cumulative weight exceeds u * total
    cdf = np.cumsum(w)
    for u in (0.0, 0.123, 0.5, 0.987654):
        j = draw(w, u)
        assert cdf[j] >= u * cdf[-1] * (1 - 1e-12) and (j == 0 or cdf[j - 1] <= u * cdf[-1] * (1 + 1e-12))
    assert w[draw(w, np.nextafter(1.0, 0.0))] > 0
    # frequencies of the heaviest bins against their probabilities
    top = np.argsort(-w)[:5]
    freq = np.array([(picks == t).mean() for t in top])
    np.testing.assert_allclose(freq, w[top] / w.sum(), atol=0.015)


def test_sampled_tokens_follow_the_filtered_distribution():
    x = _logits(n=600, seed=11)
    s = Sampler(SamplingParams(temperature=1.3, top_k=30, top_p=0.9, seed=1))
    kept, ref = _reference_survivors(x, 1.3, 30, 0.9)
    draws = np.array([s(x) for _ in range(20000)])
    assert set(draws.tolist()) <= set(kept.tolist())
    freq = np.array([(draws == k).mean() for k in kept])
    np.testing.assert_allclose(freq, ref, atol=0.015)


def test_sampler_handles_masked_logits():
    # -inf logits (a masked vocabulary) in a flat row: the bucket search must still find the reference's cut
    x = (np.random.default_rng(4).standard_normal(20000) * 0.3).astype(np.float32)
    x[::3] = -np.inf
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.9, seed=0))
    ids, _ = s.survivors(x)
    kept, _ = _reference_survivors(x, 1.0, 0, 0.9)
    np.testing.assert_array_equal(ids, kept)
    assert all(np.isfinite(x[s(x)]) for _ in range(50))
