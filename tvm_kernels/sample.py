"""A sampled token on the device: repetition penalty, temperature, top-k, top-p and the draw over one row
of logits (or, at temperature 0, the greedy token after the penalty).

Why it exists: like the greedy argmax (tvm_kernels/argmax.py), a token picked on the GPU lets a decode
step's graph feed the next step itself, so sampled decoding overlaps too (runtime/cuda_graph.py) and the
host never copies the logits out nor sorts the vocabulary.

Signature: (logits f32[1, 1, V], cfg f32[4] = [temperature (0: greedy), top_p, top_k, repetition
penalty], rng i32[2] = [seed, counter], seen i32[V], out i32[1]). The kernel increments rng[1], so each
replay of a captured graph draws afresh and a given seed gives the same tokens every time, and marks the
token it picks in `seen` (1 = in the history the repetition penalty looks at: the host fills it with the
prompt and the tokens so far when a generation starts).

Semantics are runtime/sampling.py's (Hugging Face's order): the repetition penalty divides seen tokens'
positive logits by it and multiplies negative ones; greedy takes the largest of those (lowest id among
equals); else z = logits / temperature; top-k keeps the k largest z and any tied with the k-th; top-p
keeps, in the order of decreasing probability (lower id first among equals), each token whose mass before
it is below top_p of the top-k survivors' mass. The draw is Gumbel-max: argmax(z + g) over a set of
candidates, g = -log(-log(u)), picks token i with probability softmax(z)_i within the set. u comes from
a counter-based hash of (seed, counter, round, token id), so draws differ from the host sampler's (numpy's
generator) for the same seed, not their distribution.
Top-p is rejection sampling (as FlashInfer's sampler): draw among the top-k survivors; the token is kept
if the mass ahead of it is below top_p, else every candidate from it on is past the nucleus too, and the
draw repeats among those ahead of it. A kept draw is distributed as the nucleus renormalized; a draw is
kept with probability at least top_p, so one or two rounds are the rule (after ROUNDS misses, which would
take a vanishing chance, the most likely token). Sums are float32 here and float64 in the reference:
top-p's verdict can differ where a mass is within float32 rounding of top_p. NaN logits count as -inf.

CUDA: one block (the row is in L2; 48 logits per thread for SmolLM2's 49152). Top-k's threshold (the largest
key of z, made an order-preserving integer, that at least k keys reach) is searched among few candidates:
T0, the k-th largest of the threads' own maxima, is found by bisection over its 32 bits with one barrier
popcount a round (`__syncthreads_count`); k threads hold a logit >= T0, so the threshold is >= T0 and only
the logits >= T0 decide it. Those (k to 1.6k of a random row for k up to 700) are gathered into shared memory,
up to CPT a thread, and a second 32-round bisection counts them, one popcount per bit of a thread's count.
Where k exceeds the block's threads or the candidates its shared memory (flat rows, wide ties), the
bisection runs over the whole row, two bits a round: 16 block-wide sums of three counts packed in 64
bits. Measured on the H100 for SmolLM2's vocabulary (sample_time_topk_h100.json): top-k 50 34.5 us a
call against 86.6 with the whole-row bisection (temperature alone: 25.1). Each draw is a max-reduce of
(score, id) packed in a 64-bit key, as argmax does, and each top-p verdict one block-wide sum.
"""
from __future__ import annotations

import numpy as np

from tvm_kernels.argmax import _key, threads
from tvm_kernels.errors import UserError
from tvm_kernels.targets import DeviceTarget, get_target

UNROLL = 64  # scans up to this many logits per thread are unrolled (V <= 65536 at 1024 threads)
ROUNDS = 64  # top-p draws at most this many times (a draw is accepted with probability >= top_p, and
# each miss narrows the candidates to the tokens ahead of it)
ROUND_STRIDE = 0x9E3779B9  # a draw round's offset into the hash
CPT = 4  # top-k: candidates (logits >= T0) a thread holds in the exact search; past CPT x threads, the bisection
CPT_BITS = 3  # bits of a thread's candidate count (0..CPT)


def _hash32(x):
    """lowbias32 (C. Wellons): a bijective mix of 32-bit words; numpy uint32 arrays or TIR uint32 expressions."""
    if isinstance(x, np.ndarray):
        x = x.astype(np.uint32)
        with np.errstate(over="ignore"):
            x ^= x >> np.uint32(16)
            x *= np.uint32(0x7FEB352D)
            x ^= x >> np.uint32(15)
            x *= np.uint32(0x846CA68B)
            x ^= x >> np.uint32(16)
        return x
    from tvm import tirx

    u = lambda c: tirx.const(c, "uint32")  # noqa: E731
    x = x ^ (x >> u(16))
    x = x * u(0x7FEB352D)
    x = x ^ (x >> u(15))
    x = x * u(0x846CA68B)
    return x ^ (x >> u(16))


def _round_key(seed: int, counter: int, r: int) -> np.uint32:
    """The kernel's k[4]: hash(hash(seed ^ hash(counter)) ^ r * ROUND_STRIDE)."""
    h = lambda x: _hash32(np.array([x], np.uint32))[0]  # noqa: E731
    return h(h(np.uint32(seed & 0xFFFFFFFF) ^ h(counter)) ^ np.uint32((r * ROUND_STRIDE) & 0xFFFFFFFF))


def gumbel(seed: int, counter: int, vocab: int, r: int = 0) -> np.ndarray:
    """The kernel's noise for draw round r of one step, float32 [vocab]."""
    h = _hash32(np.arange(vocab, dtype=np.uint32) ^ _round_key(seed, counter, r))
    # 23 bits: u in [2^-24, 1 - 2^-24], both ends exact in float32 (with 24 bits the top value rounds to 1.0,
    # whose noise is +inf: a token drawn regardless of its logit)
    u = ((h >> np.uint32(9)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0 ** -23)
    return (-np.log(-np.log(u))).astype(np.float32)


def survivors(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The rules over the whole vocabulary (sorting, float64), as a boolean mask of the tokens a draw may pick."""
    z = np.asarray(logits, np.float32).reshape(-1) / np.float32(temperature)
    z = np.where(np.isnan(z), -np.inf, z)
    keep = np.ones(z.size, bool)
    if 0 < top_k < z.size:
        keep = z >= np.partition(z, -top_k)[-top_k]
    if top_p < 1.0:
        w = np.where(keep, np.exp(z.astype(np.float64) - z[keep].max()), 0.0)
        w /= w.sum()
        order = np.argsort(-w, kind="stable")
        before = np.cumsum(w[order]) - w[order]
        cut = np.zeros(z.size, bool)
        cut[order[before < top_p]] = True
        keep &= cut
    return keep


def scaled(logits: np.ndarray, temperature: float, penalty: float = 1.0, seen: np.ndarray | None = None) -> np.ndarray:
    """z: the repetition penalty on the seen tokens' logits (positive / penalty, negative * penalty, as
    transformers), then / temperature (none for greedy, temperature 0); NaN as -inf. float32, as the kernel."""
    x = np.array(logits, np.float32).reshape(-1)
    if penalty != 1.0 and seen is not None:
        hit = np.asarray(seen).reshape(-1) != 0
        x[hit] = np.where(x[hit] > 0, x[hit] / np.float32(penalty), x[hit] * np.float32(penalty))
    z = x / np.float32(temperature) if temperature > 0 else x
    return np.where(np.isnan(z), -np.inf, z)


def reference(logits: np.ndarray, temperature: float, top_k: int, top_p: float, seed: int, counter: int,
              penalty: float = 1.0, seen: np.ndarray | None = None) -> int:
    """numpy: the token the kernel draws, by the kernel's steps (float64 sums where it sums in float32).
    Temperature 0 is greedy: the largest penalized logit, lowest id among equals."""
    z = scaled(logits, temperature, penalty, seen)
    if temperature <= 0:
        return int(np.argmax(z))
    ids = np.arange(z.size)
    cand = survivors(z, 1.0, top_k, 1.0)  # top-k: exact, as the kernel's bisection
    w = np.exp(z.astype(np.float64) - z.max())
    total = w[cand].sum()
    for r in range(ROUNDS):
        j = int(np.argmax(np.where(cand, z + gumbel(seed, counter, z.size, r), -np.inf)))
        if top_p >= 1.0:
            return j
        before = (z > z[j]) | ((z == z[j]) & (ids < j))  # ahead of j in the order: all top-k survivors
        if w[before].sum() < top_p * total:
            return j
        cand = before  # j is past the nucleus, so is everything after it: draw again among those ahead
    return int(np.argmax(z))


def sample(vocab: int, target: "str | DeviceTarget"):
    """PrimFunc(logits f32[1, 1, vocab], cfg f32[4], rng i32[2], seen i32[vocab], out i32[1]) for a CUDA target."""
    if vocab <= 0 or vocab >= 1 << 21:  # top-k packs three counts of up to `vocab` in one 64-bit sum
        raise UserError(f"sample: vocabulary size must be in 1..2^21-1, got {vocab}")
    dt = get_target(target)
    if not dt.is_cuda:
        raise UserError(f"sample: target {dt.name} is not a CUDA target (the CPU runtime samples on the host)")
    return _cuda(vocab, dt).with_attr("tirx.is_scheduled", True)


def _ordered(z):
    """float32 -> uint32 that orders like the float (-0.0 as +0.0, NaN lowest)."""
    from tvm import tirx

    u = tirx.reinterpret("uint32", tirx.Select(z == tirx.const(0, "float32"), tirx.const(0, "float32"), z))
    key = tirx.Select(u >= tirx.const(0x80000000, "uint32"), ~u, u | tirx.const(0x80000000, "uint32"))
    return tirx.Select(tirx.isnan(z), tirx.const(0, "uint32"), key)


def _probes(key, prefix, shift):
    """Counts of `key` >= prefix | d << shift for d = 1, 2, 3, packed at bits 0, 21, 42 of a uint64."""
    from tvm import tirx

    one = lambda d: tirx.Select(key >= (prefix | (tirx.const(d, "uint32") << shift)),  # noqa: E731
                                tirx.const(1 << (21 * (d - 1)), "uint64"), tirx.const(0, "uint64"))
    return one(1) + one(2) + one(3)


def _ahead(key, i, key_lo, id_lim):
    """Token i (with `key`) among the candidates: key > key_lo, or key == key_lo and i < id_lim."""
    from tvm import tirx

    return tirx.Or(key > key_lo, tirx.And(key == key_lo, i < id_lim))


def _id_of(packed):
    """The token id in a reduced _key (its low word holds the id's complement)."""
    from tvm import tirx

    low = tirx.Cast("uint32", packed & tirx.const(0xFFFFFFFF, "uint64"))
    return tirx.Cast("int32", tirx.const(0xFFFFFFFF, "uint32") - low)


def _cuda(V: int, dt: DeviceTarget):
    from tvm import tirx
    from tvm.script import tirx as T

    TX = threads(V, dt.max_threads_per_block)
    S = -(-V // TX)
    scan = T.unroll if S <= UNROLL else T.serial
    NEG = T.float32("-inf")

    CAP = CPT * TX

    def count(pred):
        """How many of the block's threads have `pred` (CUDA's barrier popcount: one instruction, where a
        block sum takes two rounds of shuffles and a shared-memory pass)."""
        return T.call_extern("int32", "__syncthreads_count", T.Cast("int32", pred))

    def noise(i, step):
        h = _hash32(tirx.Cast("uint32", i) ^ step)
        u = tirx.Cast("float32", h >> tirx.const(9, "uint32")) + tirx.const(0.5, "float32")
        u = u * tirx.const(2.0 ** -23, "float32")
        return -tirx.log(-tirx.log(u))

    def jitter(on, i, step):
        """The Gumbel noise of token i times `on` (1, or 0 when greedy: the noise is finite). A Select on the
        temperature here instead made the kernel 2.3x slower: 68 against 25 us a call for SmolLM2's vocabulary
        (benchmarks/results/sample_time_select_h100.json, sample_time_h100.json)."""
        return noise(i, step) * on

    def tdiv(cfg):
        """What z divides by: the temperature, 1 when greedy (temperature 0)."""
        return tirx.Select(cfg[0] > tirx.const(0, "float32"), cfg[0], tirx.const(1, "float32"))

    def zval(logits, seen, cfg, i):
        """scaled()'s z of token i with a penalty: / or * penalty if seen, then / temperature."""
        x = logits[0, 0, i]
        pen = tirx.Select(x > tirx.const(0, "float32"), x / cfg[3], x * cfg[3])
        return tirx.Select(seen[i] != 0, pen, x) / tdiv(cfg)

    @T.macro
    def block_sum(src, dst, tx):
        """dst[0] = the sum of src[0] over the block's threads (TVM's cross-thread allreduce)."""
        with T.sblock("block_sum"):
            T.reads(src[0])
            T.writes(dst[0])
            T.attr(T.comm_reducer(lambda a, b: a + b, [T.Cast(src.dtype, 0)]), "reduce_scope", T.int32(0))
            T.tvm_thread_allreduce(T.uint32(1), src[0], True, dst[0], tx, dtype="void")

    @T.macro
    def block_max(src, dst, lowest, tx):
        """dst[0] = the largest src[0] over the block's threads (`lowest`: max's identity)."""
        with T.sblock("block_max"):
            T.reads(src[0])
            T.writes(dst[0])
            T.attr(T.comm_reducer(lambda a, b: T.max(a, b), [lowest]), "reduce_scope", T.int32(0))
            T.tvm_thread_allreduce(T.uint32(1), src[0], True, dst[0], tx, dtype="void")

    @T.prim_func(private=True, s_tir=True)
    def kernel(logits: T.Buffer((1, 1, V), "float32"), cfg: T.Buffer((4,), "float32"),
               rng: T.Buffer((2,), "int32"), seen: T.Buffer((V,), "int32"), out: T.Buffer((1,), "int32")):
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):
            z = T.sblock_alloc_buffer((S,), "float32", scope="local")
            # one-element buffers for the reductions (the lowering wants them at index 0, each result its own)
            fa = T.sblock_alloc_buffer((1,), "float32", scope="local")
            qa = T.sblock_alloc_buffer((1,), "uint64", scope="local")
            r_max = T.sblock_alloc_buffer((1,), "float32", scope="local")
            r_cnt = T.sblock_alloc_buffer((1,), "uint64", scope="local")
            r_tot = T.sblock_alloc_buffer((1,), "float32", scope="local")
            r_mass = T.sblock_alloc_buffer((1,), "float32", scope="local")
            r_draw = T.sblock_alloc_buffer((1,), "uint64", scope="local")
            r_fb = T.sblock_alloc_buffer((1,), "uint64", scope="local")
            f = T.sblock_alloc_buffer((8,), "float32", scope="local")  # 2 max 3 Z 4 p*Z 5 z of a draw 6 noise on 7 thread's max
            n = T.sblock_alloc_buffer((5,), "int32", scope="local")  # 0 top-k found 1 drawn id 2 candidates' id limit 3 kept id + 1 4 top-k candidates
            # k: 0 kth key 1 candidates' lowest key 2 probe / a draw's key 3 step hash 4 round hash
            k = T.sblock_alloc_buffer((5,), "uint32", scope="local")
            ck = T.sblock_alloc_buffer((CPT,), "uint32", scope="local")  # top-k: this thread's candidates' keys
            cand = T.sblock_alloc_buffer((CAP,), "uint32", scope="shared")  # top-k: the keys >= T0
            n_sh = T.sblock_alloc_buffer((1,), "int32", scope="shared")  # top-k: how many keys are >= T0
            for bx in T.thread_binding(1, thread="blockIdx.x"):
                for tx in T.thread_binding(TX, thread="threadIdx.x"):
                    with T.sblock("sample"):
                        T.reads(logits[0, 0, 0:V], cfg[0:4], rng[0:2], seen[0:V])
                        T.writes(out[0], rng[1], seen[0:V])
                        k[3] = _hash32(T.Cast("uint32", rng[0]) ^ _hash32(T.Cast("uint32", rng[1])))
                        f[6] = T.Select(cfg[0] > T.float32(0), T.float32(1), T.float32(0))
                        # the penalty's branch around the loop, not in it: without a penalty the loads are those
                        # of a plain scaled copy
                        if cfg[3] != T.float32(1):
                            for s in scan(S):
                                z[s] = NEG
                                if s * TX + tx < V:
                                    z[s] = zval(logits, seen, cfg, s * TX + tx)
                        else:
                            for s in scan(S):
                                z[s] = NEG
                                if s * TX + tx < V:
                                    z[s] = logits[0, 0, s * TX + tx] / tdiv(cfg)
                        fa[0] = NEG
                        for s in scan(S):
                            if T.isnan(z[s]):
                                z[s] = NEG
                            fa[0] = T.max(fa[0], z[s])
                        f[7] = fa[0]
                        block_max(fa, r_max, NEG, tx)
                        f[2] = r_max[0]
                        # top-k: the largest key with at least k keys >= it
                        k[0] = T.uint32(0)
                        if 0 < T.Cast("int32", cfg[2]) and T.Cast("int32", cfg[2]) < V and cfg[0] > T.float32(0):
                            n[0] = 0  # 1: the threshold found among the candidates
                            if T.Cast("int32", cfg[2]) <= TX:
                                # T0, the k-th largest of the threads' own maxima: k threads hold a logit >= T0, so
                                # the threshold is >= T0, and only the logits >= T0 (about k to 1.6k of a random row) decide it
                                k[1] = T.uint32(0)
                                for b in T.serial(32):
                                    k[2] = k[1] | (T.uint32(1) << (T.uint32(31) - T.Cast("uint32", b)))
                                    if count(_ordered(f[7]) >= k[2]) >= T.Cast("int32", cfg[2]):
                                        k[1] = k[2]
                                if tx == 0:
                                    n_sh[0] = 0
                                T.tvm_storage_sync("shared")
                                for s in scan(S):
                                    if s * TX + tx < V and _ordered(z[s]) >= k[1]:
                                        n[1] = T.call_extern("int32", "atomicAdd", T.address_of(n_sh[0]), 1)
                                        if n[1] < CAP:
                                            cand[n[1]] = _ordered(z[s])
                                T.tvm_storage_sync("shared")
                                n[4] = n_sh[0]
                                if n[4] <= CAP:
                                    for c in T.unroll(CPT):
                                        ck[c] = T.Select(c * TX + tx < n[4], cand[T.min(c * TX + tx, CAP - 1)], T.uint32(0))
                                    for b in T.serial(32):
                                        k[2] = k[0] | (T.uint32(1) << (T.uint32(31) - T.Cast("uint32", b)))
                                        n[1] = 0
                                        for c in T.unroll(CPT):
                                            n[1] = n[1] + T.Cast("int32", ck[c] >= k[2])
                                        # the block's sum of counts 0..CPT, one barrier popcount per bit
                                        n[2] = 0
                                        for d in T.unroll(CPT_BITS):
                                            n[2] = n[2] + count(T.bitwise_and(T.shift_right(n[1], d), 1) != 0) * (1 << d)
                                        if n[2] >= T.Cast("int32", cfg[2]):
                                            k[0] = k[2]
                                    n[0] = 1
                            if n[0] == 0:
                                # k above the block's threads, or too many candidates (flat rows, wide ties): bisection
                                # over the whole row, two bits a round, three counts packed in one 64-bit sum
                                # (padding is -inf: key below any real)
                                for b in T.serial(16):
                                    k[2] = T.uint32(30) - T.Cast("uint32", b) * T.uint32(2)
                                    qa[0] = T.uint64(0)
                                    for s in scan(S):
                                        if s * TX + tx < V:
                                            qa[0] = qa[0] + _probes(_ordered(z[s]), k[0], k[2])
                                    block_sum(qa, r_cnt, tx)
                                    k[1] = k[0]
                                    for d in T.unroll(3):  # probes 1, 2, 3: the largest whose count reaches k
                                        if (T.Cast("int32", (r_cnt[0] >> T.Cast("uint64", 21 * d)) & T.uint64(0x1FFFFF))
                                                >= T.Cast("int32", cfg[2])):
                                            k[1] = k[0] | (T.Cast("uint32", d + 1) << k[2])
                                    k[0] = k[1]
                        fa[0] = T.float32(0)
                        for s in scan(S):
                            if s * TX + tx < V and _ordered(z[s]) >= k[0]:
                                fa[0] = fa[0] + T.exp(z[s] - f[2])
                        block_sum(fa, r_tot, tx)
                        f[3] = r_tot[0]
                        # candidates: key > k[1], or key == k[1] and id < n[2] (first: the top-k survivors)
                        k[1] = k[0]
                        n[2] = V
                        n[3] = 0  # the drawn token, once accepted (+1)
                        f[4] = cfg[1] * f[3]
                        for r in T.serial(ROUNDS):
                            if n[3] == 0:
                                # Gumbel-max over the candidates: (score, id) as one key, lowest id among equals
                                k[4] = _hash32(k[3] ^ T.Cast("uint32", r) * T.uint32(ROUND_STRIDE))
                                qa[0] = T.uint64(0)
                                for s in scan(S):
                                    if s * TX + tx < V and _ahead(_ordered(z[s]), s * TX + tx, k[1], n[2]):
                                        qa[0] = T.max(qa[0], _key(z[s] + jitter(f[6], s * TX + tx, k[4]), s * TX + tx))
                                block_max(qa, r_draw, T.uint64(0), tx)
                                n[1] = _id_of(r_draw[0])
                                if cfg[1] < T.float32(1) and cfg[0] > T.float32(0):
                                    # accepted if the mass ahead of it in the order is below top_p of the survivors'
                                    f[5] = logits[0, 0, n[1]]  # its z, as the load computed it (spelled out
                                    if cfg[3] != T.float32(1):  # here: as one expression, ptxas spilled more)
                                        if seen[n[1]] != 0:
                                            f[5] = T.Select(f[5] > T.float32(0), f[5] / cfg[3], f[5] * cfg[3])
                                    k[2] = _ordered(f[5] / cfg[0])
                                    fa[0] = T.float32(0)
                                    for s in scan(S):
                                        if s * TX + tx < V and _ahead(_ordered(z[s]), s * TX + tx, k[2], n[1]):
                                            fa[0] = fa[0] + T.exp(z[s] - f[2])
                                    block_sum(fa, r_mass, tx)
                                    if r_mass[0] < f[4]:
                                        n[3] = n[1] + 1
                                    else:  # past the nucleus, and so is all after it: draw among those ahead
                                        k[1] = k[2]
                                        n[2] = n[1]
                                else:
                                    n[3] = n[1] + 1
                        if n[3] == 0:  # no draw accepted in ROUNDS (vanishingly rare): the most likely token
                            qa[0] = T.uint64(0)
                            for s in scan(S):
                                if s * TX + tx < V:
                                    qa[0] = T.max(qa[0], _key(z[s], s * TX + tx))
                            block_max(qa, r_fb, T.uint64(0), tx)
                            n[3] = _id_of(r_fb[0]) + 1
                        if tx == 0:
                            out[0] = n[3] - 1
                            rng[1] = rng[1] + 1
                            seen[n[3] - 1] = 1  # the token joins the history the penalty looks at

    return kernel
