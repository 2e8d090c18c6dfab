"""The device sampler's numpy reference (tvm_kernels/sample.py) against the host sampler's rules, its
noise, and the CUDA builds. The kernel itself runs on the GPU machine against this reference
(benchmarks/e2e.py device-graph -> benchmarks/results/cuda_graph_sample_h100.json)."""
import numpy as np
import pytest

from runtime.sampling import softmax, top_k_filter, top_p_filter
from tests.cuda_build import build_and_check_cubin
from tvm_kernels.errors import UserError
from tvm_kernels.sample import gumbel, reference, sample, survivors


@pytest.mark.parametrize("scale", [0.3, 3.0, 30.0])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (0, 0.9), (50, 1.0), (40, 0.95), (1, 1.0), (0, 0.01)])
def test_survivors_are_the_host_rules(scale, top_k, top_p):
    rng = np.random.default_rng(int(scale * 10) + top_k)
    x = (rng.standard_normal(5000) * scale).astype(np.float32)
    x[rng.integers(0, 5000, 6)] = x.max()  # ties at the top
    host = np.isfinite(top_p_filter(top_k_filter(x / np.float32(0.7), top_k), top_p))
    np.testing.assert_array_equal(survivors(x, 0.7, top_k, top_p), host)


def test_noise_is_gumbel_and_repeats_per_seed_and_step():
    g = gumbel(7, 0, 200000)
    assert g.dtype == np.float32 and np.isfinite(g).all()
    np.testing.assert_array_equal(g, gumbel(7, 0, 200000))
    assert not np.array_equal(g[:100], gumbel(7, 1, 100)) and not np.array_equal(g[:100], gumbel(8, 0, 100))
    # Gumbel(0, 1): mean = Euler's gamma, variance = pi^2 / 6
    assert abs(g.mean() - 0.5772) < 0.01 and abs(g.var() - np.pi ** 2 / 6) < 0.03


def test_draws_follow_the_filtered_softmax():
    x = (np.random.default_rng(1).standard_normal(300) * 2).astype(np.float32)
    keep = survivors(x, 1.3, 30, 0.9)
    probs = softmax(np.where(keep, x / np.float32(1.3), -np.inf))
    draws = np.array([reference(x, 1.3, 30, 0.9, seed=5, counter=c) for c in range(20000)])
    assert keep[draws].all()
    freq = np.bincount(draws, minlength=x.size) / draws.size
    np.testing.assert_allclose(freq[keep], probs[keep], atol=0.012)


@pytest.mark.parametrize("row", ["random", "one thread holds the top", "ties"])
def test_topk_threshold_from_the_threads_maxima(row):
    """The kernel's top-k search, step by step in numpy: T0 = the k-th largest of the 1024 threads' maxima
    (thread t holds ids t, t + 1024, ...); the largest key reached by k of the logits >= T0 is the exact
    threshold of the whole row (np.partition's k-th value)."""
    rng, TX = np.random.default_rng(4), 1024
    x = (rng.standard_normal(49152) * 3).astype(np.float32)
    if row == "one thread holds the top":
        x[np.arange(48) * TX + 5] += 40
    if row == "ties":
        x[rng.choice(x.size, 300, replace=False)] = x.max()
    for k in (1, 7, 50, 100, 700, 1024):
        t0 = np.sort(x.reshape(-1, TX).max(axis=0))[-k]
        cand = x[x >= t0]
        assert cand.size >= k
        kth = np.sort(cand)[-k]  # the bisection's answer: the largest value that k candidates reach
        assert kth == np.partition(x, -k)[-k]


def test_nan_logits_are_never_drawn():
    x = np.array([1.0, np.nan, 0.5, np.nan], np.float32)
    assert {reference(x, 1.0, 0, 1.0, 0, c) for c in range(200)} == {0, 2}


def test_bad_input_is_one_line_error():
    with pytest.raises(UserError, match="vocabulary size"):
        sample(0, "cuda-sm90")
    with pytest.raises(UserError, match="not a CUDA target"):
        sample(100, "cpu")


@pytest.mark.parametrize("target,arch", [("cuda-sm90", "sm_90"), ("jetson-orin", "sm_87")])
def test_cuda_sample_builds(tmp_path, target, arch):
    build_and_check_cubin(tmp_path, target, arch, """
        from tvm_kernels.sample import sample
        funcs = {"sample_49152": sample(49152, t), "sample_100": sample(100, t), "sample_262144": sample(262144, t)}
    """)


def test_rejection_rounds_for_a_small_nucleus_of_a_flat_row():
    # top_p 0.05 of a flat row: a first draw is kept only ~5% of the time; the rounds that follow draw among
    # the tokens ahead of each miss, and what is kept must still follow the nucleus' renormalized softmax
    x = (np.random.default_rng(2).standard_normal(2000) * 0.5).astype(np.float32)
    keep = survivors(x, 1.0, 0, 0.05)
    probs = softmax(np.where(keep, x, -np.inf))
    draws = np.array([reference(x, 1.0, 0, 0.05, seed=1, counter=c) for c in range(6000)])
    assert keep[draws].all() and keep.sum() > 20
    freq = np.bincount(draws, minlength=x.size) / draws.size
    np.testing.assert_allclose(freq[keep], probs[keep], atol=0.01)


def test_noise_is_finite_at_the_ends_of_the_hash():
    from tvm_kernels.sample import _hash32, _round_key

    # ids whose hash is the largest / smallest 23-bit value: u stays inside (0, 1), the noise finite
    key = _round_key(7, 0, 0)
    h = _hash32(np.arange(1 << 20, dtype=np.uint32) ^ key) >> np.uint32(9)
    g = gumbel(7, 0, 1 << 20)
    assert np.isfinite(g[h == h.max()]).all() and np.isfinite(g[h == h.min()]).all()
    u = (np.float32((1 << 23) - 1) + np.float32(0.5)) * np.float32(2.0 ** -23)
    assert u < 1 and np.isfinite(-np.log(-np.log(u)))


def test_penalty_and_greedy_follow_the_host_sampler():
    from runtime.sampling import Sampler, SamplingParams, repetition_penalty
    from tvm_kernels.sample import scaled

    x = (np.random.default_rng(3).standard_normal(500) * 2).astype(np.float32)
    history = [3, 7, 7, int(np.argmax(x)), 499]
    seen = np.zeros(x.size, np.int32)
    seen[history] = 1
    # the penalty, then the temperature: bit for bit the host's float32 arithmetic
    np.testing.assert_array_equal(scaled(x, 0.8, 1.3, seen), repetition_penalty(x, history, 1.3) / np.float32(0.8))
    # temperature 0: greedy on the penalized logits, as the host sampler (its first choice is penalized away)
    greedy = Sampler(SamplingParams(repetition_penalty=1.3))(x, history)
    assert reference(x, 0.0, 0, 1.0, 1, 0, 1.3, seen) == greedy != int(np.argmax(x))
    # sampled with the penalty: the draws follow the penalized, filtered softmax
    z = scaled(x, 0.8, 1.3, seen)
    keep = survivors(z, 1.0, 40, 0.9)
    probs = softmax(np.where(keep, z, -np.inf))
    draws = np.array([reference(x, 0.8, 40, 0.9, 2, c, 1.3, seen) for c in range(20000)])
    assert keep[draws].all()
    np.testing.assert_allclose((np.bincount(draws, minlength=x.size) / draws.size)[keep], probs[keep], atol=0.012)
