"""Relax pipeline for CPU (llvm) targets.

TVM's stock CPU pipeline leaves every fused PrimFunc unscheduled: one thread, scalar loops (a
SmolLM2 decode step took seconds). Here matmuls (the FP16 lm_head: 57 MB per token for SmolLM2) get
a vectorized rfactor schedule, four outputs per step sharing each activation load; the paged KV
cache's fused_rope computes its cos/sin once for all heads; dlight's CPU reduction rule takes the
norms, and a last rule runs any other loop nest in parallel over its rows, vectorized along a static
innermost dimension. Hand-scheduled kernels (tvm_kernels) arrive marked as scheduled and are left alone.

Decode attention: TVM's paged KV cache brings its own CPU decode kernel (`batch_decode_paged_kv_cpu`),
scalar and one thread, with one online-softmax rescale and two libm exp2 calls per cached token: at a
2048-token context it was most of a SmolLM2 decode step. `attention_pass` swaps it for
`decode_attention_cpu` below (same signature): KV heads and slices of the context in parallel (a second
loop merges the slices), head_dim in vector lanes, the softmax rescale once per page of tokens, and a
polynomial exp2 that vectorizes. Its ragged prefill
kernel scored every key for every query (masked or not) in scalar code, minutes for a 2048-token
prompt; `prefill_attention_cpu` takes the chunk's own keys in tiles, many query rows at once, both products
as register tiles (as the prefill GEMM), causal limit per row; built with `page_size` it replaces the paged
prefill kernel too (a chunk against the tokens cached before it: the next chat turn, a long prompt's
second chunk), scalar and one thread in TVM.
Their numpy reference is the CUDA decode kernel's, `tvm_kernels.decode_attention.reference`.
"""
from __future__ import annotations

import math

LOG2E = math.log2(math.e)
STOCK_DECODE_ATTENTION = "batch_decode_paged_kv_cpu"  # the global_symbol TVM 0.27 gives its CPU kernel
STOCK_PREFILL_ATTENTION = "batch_prefill_ragged_kv"  # ... and its CPU ragged prefill kernel
STOCK_PAGED_PREFILL_ATTENTION = "batch_prefill_paged_kv_cpu"  # ... and its paged one (not the sliding window's)
ROPE_BLOCK = "llama_fused_rope"  # the block of the paged KV cache's fused_rope (TVM 0.27)
# Decode attention splits each KV head's context into up to this many slices of at least this many pages,
# parallel tasks whose partial softmax states a second loop merges (3 KV heads on 2 threads left a thread idle)
DECODE_SLICES, DECODE_SLICE_MIN_PAGES = 8, 4


def _rules():
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import ScheduleRule, try_inline_contiguous_spatial

    def blocks(func):
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        infos = try_inline_contiguous_spatial(sch, infos) if infos is not None else None
        return sch, infos

    def lead_spatial(kinds: str) -> int:
        return len(kinds) - len(kinds.lstrip("S"))

    def parallel_nest(sch, block, kinds: str) -> bool:
        loops = sch.get_loops(block)
        n = lead_spatial(kinds)
        if n == 0 or len(loops) != len(kinds):
            return False
        last = sch.get(loops[-1]).extent
        if n == len(kinds) and hasattr(last, "value") and int(last) % 8 == 0:
            # elementwise: rows in parallel, the static innermost dimension in vector lanes (fusing all
            # loops costs two int64 divisions per element)
            mid, inner = sch.split(loops[-1], factors=[None, 8])
            sch.vectorize(inner)
            sch.parallel(sch.fuse(*loops[:-1]) if n > 2 else loops[0] if n == 2 else mid)
            return True
        sch.parallel(sch.fuse(*loops[:n]) if n > 1 else loops[0])
        return True

    @ScheduleRule.from_callable("MatmulRFactor")
    def matmul(func, target, _tunable):
        # y[s, n] = sum_k a[s, k] * b[n, k]: both operands K-contiguous, so vector lanes go along K.
        # rfactor keeps acc * lanes partial sums per output (vectorized), then a short loop adds them up.
        if target.kind.name != "llvm":
            return None
        sch, infos = blocks(func)
        if not infos:
            return None
        red = [i for i in infos if i.is_reduction()]
        if len(red) != 1 or any(not i.is_injective() for i in infos if i is not red[0]):
            return None
        info = red[0]
        kinds = info.dom_kind()
        if not (kinds.endswith("R") and kinds.count("R") == 1 and lead_spatial(kinds) == len(kinds) - 1):
            return None
        K = info.iters[-1].dom
        if not isinstance(K, int) and not hasattr(K, "value"):
            return None
        K = int(K)
        lanes = 8  # fp32 lanes of an AVX2 register (two NEON registers)
        if K % lanes or K < 2 * lanes:
            return None
        loops = sch.get_loops(info.block_rv)
        s = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
        n_out = sch.get(s).extent
        # `rows` outputs per step share each activation load and its fp16->fp32 conversion (the weight
        # stream is then one load + convert + FMA per 8 products); `acc` vector accumulators per output
        # hide the FMA latency (one chain of K/8 FMAs would wait 4 cycles per FMA). rows * acc * lanes
        # partial sums stay in registers (16 on AVX2).
        rows = 4 if hasattr(n_out, "value") and int(n_out) % 4 == 0 and int(n_out) >= 64 else 1
        acc = (2 if rows > 1 else 4) if K % (4 * lanes) == 0 else 2 if K % (2 * lanes) == 0 else 1
        _, ki = sch.split(loops[-1], factors=[None, acc * lanes])
        rf = sch.rfactor(ki, factor_axis=-1)  # the acc * lanes partial sums of one output, contiguous
        s_rf, ko, ki_rf = sch.get_loops(rf)
        ka, kv = sch.split(ki_rf, factors=[acc, lanes])
        if rows > 1:
            s_rf, s_in = sch.split(s_rf, factors=[None, rows])
            sch.reorder(s_rf, ko, s_in, ka, kv)
            sch.unroll(s_in)
        sch.unroll(ka)
        sch.vectorize(kv)
        # the final sums right after their partial sums: the partials stay a small per-step buffer
        # (registers) instead of an [outputs, acc * lanes] array written and read back
        sch.reverse_compute_at(info.block_rv, s_rf)
        sch.parallel(s_rf)
        for other in infos:
            if other is not info:
                parallel_nest(sch, other.block_rv, other.dom_kind())
        return sch

    @ScheduleRule.from_callable("ParallelSpatial")
    def parallel(func, target, _tunable):
        if target.kind.name != "llvm":
            return None
        sch, infos = blocks(func)
        if not infos:
            return None
        done = False
        for info in infos:
            done |= parallel_nest(sch, info.block_rv, info.dom_kind())
        return sch if done else None

    @ScheduleRule.from_callable("RopeHeadsInner")
    def rope(func, target, _tunable):
        # The paged KV cache's fused_rope computes cos/sin (and pow) of the angle for every element of
        # every head: ~2k libm calls per layer and token. With the heads innermost and unrolled, the
        # calls for one (position, dim) are identical pure expressions that LLVM computes once.
        if target.kind.name != "llvm":
            return None
        sch, infos = blocks(func)
        if not infos or len(infos) != 1 or sch.get(infos[0].block_rv).name_hint != ROPE_BLOCK:
            return None
        loops = sch.get_loops(infos[0].block_rv)
        if infos[0].dom_kind() != "SSS" or len(loops) != 3 or not hasattr(sch.get(loops[1]).extent, "value"):
            return None
        tok, head, dim = loops
        sch.reorder(tok, dim, head)
        sch.unroll(head)
        sch.parallel(tok)
        return sch

    return [matmul, rope, parallel]


# ------------------------------------------------------------------------------------------------
# decode attention over the paged KV cache

def _exp2(x):
    """2^x for x <= 0 in float32 (vectorizable TIR, no libm call): 2^x = 2^n * 2^f, n = round(x),
    f in [-0.5, 0.5], 2^f by Cephes' exp2f polynomial (relative error ~2e-7); x below -126 gives 2^-126."""
    from tvm import tirx
    from tvm.script import tirx as T

    x = T.max(x, T.float32(-126.0))
    n = T.floor(x + T.float32(0.5))
    f = x - n
    p = T.float32(1.535336188319500e-4)
    for c in (1.339887440266574e-3, 9.618437357674640e-3, 5.550332471162809e-2, 2.402264791363012e-1,
              6.931472028550421e-1):
        p = p * f + T.float32(c)
    p = p * f + T.float32(1.0)
    two_n = tirx.reinterpret("float32", T.shift_left(T.Cast("int32", n) + 127, 23))
    return p * two_n


def _attention_macros(group: int, D: int, P: int, dtype: str):
    """What both CPU attention kernels do per task: the `group` query heads of one KV head in float32
    (q, output accumulator o), scores of up to P keys at a time in sc, the online softmax in st (running
    max, running sum, tile max, rescale), each K/V row converted to float32 once for the whole group."""
    from tvm.script import tirx as T

    VL = 8

    @T.macro
    def load_query(Q, qi, hk, q, o, st, sm_scale):
        for g in T.serial(group):
            for d in T.vectorized(D):
                # scores in base 2: exp(s) = exp2(s * log2(e))
                q[g, d] = T.Cast("float32", Q[qi, hk * group + g, d]) * sm_scale * T.float32(LOG2E)
                o[g, d] = T.float32(0)
            st[g, 0] = T.float32(-5e4)
            st[g, 1] = T.float32(0)

    @T.macro
    def score_row(q, kf, acc, sc, r):  # sc[:, r] = q . k for every head of the group, two FMA chains each
        for g in T.serial(group):
            for a in T.serial(2):
                for v in T.vectorized(VL):
                    acc[g, a, v] = T.float32(0)
            for dc in T.unroll(D // VL):
                for v in T.vectorized(VL):
                    acc[g, dc % 2, v] = acc[g, dc % 2, v] + q[g, dc * VL + v] * kf[dc * VL + v]
            # the lanes summed as a tree (halves added, 4 steps): a running scalar sum was a chain of 16
            # dependent adds per score, most of a decode step's attention time at long contexts
            for v in T.vectorized(VL):
                acc[g, 0, v] = acc[g, 0, v] + acc[g, 1, v]
            for v in T.vectorized(VL // 2):
                acc[g, 0, v] = acc[g, 0, v] + acc[g, 0, v + VL // 2]
            for v in T.vectorized(VL // 4):
                acc[g, 0, v] = acc[g, 0, v] + acc[g, 0, v + VL // 4]
            sc[g, r] = acc[g, 0, 0] + acc[g, 0, 1]

    @T.macro
    def softmax_tile(sc, st, o, rows):  # fold the tile's first `rows` scores in; sc becomes their weights
        for g in T.serial(group):
            st[g, 2] = st[g, 0]
            for r in T.serial(P):
                st[g, 2] = T.if_then_else(r < rows, T.max(st[g, 2], sc[g, r]), st[g, 2])
            for r in T.vectorized(P):
                # rows past `rows` hold stale scores (or stale cache memory): selected away, never multiplied
                sc[g, r] = T.if_then_else(r < rows, _exp2(sc[g, r] - st[g, 2]), T.float32(0))
            st[g, 3] = _exp2(st[g, 0] - st[g, 2])
            st[g, 0] = st[g, 2]
            st[g, 1] = st[g, 1] * st[g, 3]
            for r in T.serial(P):
                st[g, 1] = st[g, 1] + sc[g, r]
            for d in T.vectorized(D):
                o[g, d] = o[g, d] * st[g, 3]

    @T.macro
    def add_value_row(kf, sc, o, r):  # o += weight of key r x its value row (in kf)
        for g in T.serial(group):
            for d in T.vectorized(D):
                o[g, d] = o[g, d] + sc[g, r] * kf[d]

    @T.macro
    def store(output, lse, qi, hk, o, st):
        for g in T.serial(group):
            for d in T.vectorized(D):
                output[qi, hk * group + g, d] = T.Cast(
                    dtype, T.if_then_else(st[g, 1] > T.float32(0), o[g, d] / st[g, 1], T.float32(0)))
            lse[qi, hk * group + g] = st[g, 0] + T.log2(T.max(st[g, 1], T.float32(1e-30)))

    return load_query, score_row, softmax_tile, add_value_row, store


def decode_attention_cpu(H_qo: int, H_kv: int, D: int, page_size: int, dtype: str = "float16"):
    """Decode attention (one query token per sequence) over the paged cache, with the signature of TVM's
    `batch_decode_paged_kv_cpu` (no sliding window). Rotary embedding must already be applied to q and the
    cached k (RopeMode.NORMAL: the cache's split_rotary does it); rotary_mode 1 (inline) is refused.
    Tasks: each KV head's context in up to DECODE_SLICES slices; each slice leaves its unnormalized output,
    running max and sum, merged per head by a second parallel loop (e2e_cpu_decode_attention_ab.json)."""
    from tvm.script import tirx as T

    P = page_size
    VL = 8
    if D % VL:
        raise ValueError(f"decode_attention_cpu: head_dim {D} must be a multiple of {VL}")
    group = H_qo // H_kv
    load_query, score_row, softmax_tile, add_value_row, store = _attention_macros(group, D, P, dtype)
    NS, MIN_PAGES = DECODE_SLICES, DECODE_SLICE_MIN_PAGES

    @T.prim_func(s_tir=True)
    def attn(
        Q_handle: T.handle,
        pages_handle: T.handle,
        page_table_indptr_handle: T.handle,
        page_table_values_handle: T.handle,
        var_length_info: T.handle,
        k_rope_pos_offset_handle: T.handle,
        q_rope_position_handle: T.handle,
        output_handle: T.handle,
        lse_handle: T.handle,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        B = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        o_indptr = T.int32()
        o_values = T.int32()
        o_krope = T.int32()
        o_qrope = T.int32()
        o_len = T.int32()
        Q = T.match_buffer(Q_handle, (B, H_qo, D), dtype)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, H_kv, P, D), dtype)
        page_table_indptr = T.match_buffer(page_table_indptr_handle, (B + 1,), "int32", elem_offset=o_indptr)
        page_table_values = T.match_buffer(page_table_values_handle, (nnz_pages,), "int32", elem_offset=o_values)
        k_rope_pos_offset = T.match_buffer(k_rope_pos_offset_handle, (B,), "int32", elem_offset=o_krope)
        q_rope_position = T.match_buffer(q_rope_position_handle, (B,), "int32", elem_offset=o_qrope)
        last_page_len = T.match_buffer(var_length_info, (B,), "int32", elem_offset=o_len)
        output = T.match_buffer(output_handle, (B, H_qo, D), dtype)
        lse = T.match_buffer(lse_handle, (B, H_qo), "float32")
        assert rotary_mode == 0, "decode_attention_cpu: inline rotary (rotary_mode 1) is not implemented"
        with T.sblock("root"):
            part_o = T.sblock_alloc_buffer((B, H_kv, NS, group, D), "float32")  # a slice's unnormalized output
            part_st = T.sblock_alloc_buffer((B, H_kv, NS, group, 2), "float32")  # its max and sum (base 2)
            for task in T.parallel(B * H_kv * NS):
                with T.sblock("slice"):
                    # whole-buffer regions: the page indices are data-dependent
                    T.reads(Q[0:B, 0:H_qo, 0:D], pages[0:max_num_pages, 0:2, 0:H_kv, 0:P, 0:D],
                            page_table_indptr[0:B + 1], page_table_values[0:nnz_pages], last_page_len[0:B])
                    T.writes(part_o[0:B, 0:H_kv, 0:NS, 0:group, 0:D], part_st[0:B, 0:H_kv, 0:NS, 0:group, 0:2])
                    # one task = the `group` query heads that share a KV head, over one slice of the context:
                    # each K/V row is loaded and converted to float32 once for all of them
                    q = T.sblock_alloc_buffer((group, D), "float32")
                    o = T.sblock_alloc_buffer((group, D), "float32")
                    kf = T.sblock_alloc_buffer((D,), "float32")
                    acc = T.sblock_alloc_buffer((group, 2, VL), "float32")  # two FMA chains per dot product
                    sc = T.sblock_alloc_buffer((group, P), "float32")
                    st = T.sblock_alloc_buffer((group, 4), "float32")  # running max, running sum, page max, rescale
                    b: T.let[T.int32] = task // (H_kv * NS)
                    hk: T.let[T.int32] = task // NS % H_kv
                    begin: T.let[T.int32] = page_table_indptr[b]
                    npages: T.let[T.int32] = page_table_indptr[b + 1] - begin
                    per: T.let[T.int32] = T.max(MIN_PAGES, (npages + NS - 1) // NS)
                    p0: T.let[T.int32] = T.min(task % NS * per, npages)
                    load_query(Q, b, hk, q, o, st, sm_scale)
                    for pi in T.serial(T.min(p0 + per, npages) - p0):
                        page: T.let[T.int32] = page_table_values[begin + p0 + pi]
                        rows: T.let[T.int32] = T.if_then_else(p0 + pi == npages - 1, last_page_len[b], P)
                        # the cache is read once per step (cold): fetch the next page's K and V rows of this
                        # head while this one is computed (pages are not in address order)
                        nxt: T.let[T.int32] = page_table_values[begin + T.min(p0 + pi + 1, npages - 1)]
                        for kv_, line in T.grid(2, P * D * 2 // 64):
                            T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(
                                pages[nxt, kv_, hk, line * 64 // (2 * D), line * 64 // 2 % D]),
                                T.int32(0), T.int32(3), T.int32(1)))
                        # all P rows are scored (a fixed-length loop); rows past the page's fill are masked
                        for r in T.serial(P):
                            for d in T.vectorized(D):
                                kf[d] = T.Cast("float32", pages[page, 0, hk, r, d])
                            score_row(q, kf, acc, sc, r)
                        softmax_tile(sc, st, o, rows)
                        for r in T.serial(rows):
                            for d in T.vectorized(D):
                                kf[d] = T.Cast("float32", pages[page, 1, hk, r, d])
                            add_value_row(kf, sc, o, r)
                    # an empty slice leaves max NEG and sum 0: weight 0 in the merge
                    for g in T.serial(group):
                        for d in T.vectorized(D):
                            part_o[b, hk, task % NS, g, d] = o[g, d]
                        part_st[b, hk, task % NS, g, 0] = st[g, 0]
                        part_st[b, hk, task % NS, g, 1] = st[g, 1]
            for bk in T.parallel(B * H_kv):
                with T.sblock("merge"):
                    T.reads(part_o[0:B, 0:H_kv, 0:NS, 0:group, 0:D], part_st[0:B, 0:H_kv, 0:NS, 0:group, 0:2])
                    T.writes(output[0:B, 0:H_qo, 0:D], lse[0:B, 0:H_qo])
                    o = T.sblock_alloc_buffer((group, D), "float32")
                    st = T.sblock_alloc_buffer((group, 4), "float32")  # max, sum, a slice's weight
                    b: T.let[T.int32] = bk // H_kv
                    hk: T.let[T.int32] = bk % H_kv
                    for g in T.serial(group):
                        st[g, 0] = part_st[b, hk, 0, g, 0]
                        for c in T.serial(1, NS):
                            st[g, 0] = T.max(st[g, 0], part_st[b, hk, c, g, 0])
                        st[g, 1] = T.float32(0)
                        for d in T.vectorized(D):
                            o[g, d] = T.float32(0)
                        for c in T.serial(NS):
                            st[g, 2] = _exp2(part_st[b, hk, c, g, 0] - st[g, 0])
                            st[g, 1] = st[g, 1] + part_st[b, hk, c, g, 1] * st[g, 2]
                            for d in T.vectorized(D):
                                o[g, d] = o[g, d] + part_o[b, hk, c, g, d] * st[g, 2]
                    store(output, lse, b, hk, o, st)

    return attn


def prefill_attention_cpu(H_qo: int, H_kv: int, D: int, dtype: str = "float16", tile: int = 16,
                          page_size: int | None = None):
    """Attention of a chunk of new tokens to themselves (causal or not), with the signature of TVM's CPU
    `batch_prefill_ragged_kv`: q [n, H_qo, D], k/v [n_kv, H_kv, D] contiguous per sequence. The stock
    kernel scores every key for every query, masked or not, in scalar code (minutes for a 2048-token
    prompt). Here one task = a few query tokens x the query heads of one KV head, R = lcm(24, group) rows
    (parallel over tasks). Per tile of `tile` keys, K and V are converted to float32 once for all R rows and
    both products run as register tiles of 12 vector accumulators, as the prefill GEMM's
    (tvm_kernels.gemm_w4a16._cpu_kernel): scores with the rows as vector lanes (q stored transposed, 4 keys
    broadcast x 3 vectors of rows), the online softmax for all rows at once along those lanes (base 2, causal
    limit per row), then o += p V with 6 rows' weights broadcast x 2 vectors of the head dim. The kernel it
    replaced (one query token per task: a dot product and a horizontal sum per score, every K/V row
    converted for every token) took 2.3x as long on 2 threads (benchmarks/kernels.py cpu-attention ->
    attention_cpu.json: 45.6 against 107.5 ms for SmolLM2's heads at 2048 tokens).

    `page_size`: the same kernel over the paged cache instead, with the signature of TVM's CPU
    `batch_prefill_paged_kv_cpu` (no sliding window): a chunk's queries against the tokens cached before it
    (a follow-up chat turn, the second chunk of a long prompt). TVM's kernel there runs one thread over every
    (head, query, key) in scalar code: a 200-token turn after 1500 cached tokens took 4.6 s against 0.56 s
    with this kernel (benchmarks/results/e2e_cpu_turn.json)."""
    from tvm.relax.frontend.nn.llm._kernel_common import _get_kv_chunk_len
    from tvm.script import tirx as T

    VL = 8
    if D % VL:
        raise ValueError(f"prefill_attention_cpu: head_dim {D} must be a multiple of {VL}")
    group = H_qo // H_kv
    P = tile
    RW = 3 * VL  # rows of a score tile: three vectors of rows, against JT keys broadcast
    JT = 4  # keys of a score tile: 4 x 3 vectors of accumulators
    RI = 6  # rows of an o += p V tile: 6 rows x 2 vectors of accumulators (AVX2 has 16 registers)
    R = RW * group // math.gcd(RW, group)  # rows of a task (query heads x tokens): whole tiles of whole tokens
    QT = R // group  # query tokens of a task
    CW = 2 * VL if D % (2 * VL) == 0 else VL  # output columns of an o += p V tile
    NEG = -5e4  # as the decode kernel: finite, so exp2(NEG - m) underflows to 0 without inf - inf
    PAGED, PS = page_size is not None, page_size or 1

    @T.macro
    def rows_task(Q, KV0, KV1, page_values, q0, qlen, klen, kbase, task, causal, sm_scale, output, lse):
        """One task: R rows of the sequence whose tokens start at q0, against its klen keys (k / v rows from
        kbase, or, PAGED, the pages listed from kbase in page_values), into output / lse."""
        # row r of a task: token r // group, query head r % group of this KV head
        qt = T.sblock_alloc_buffer((D, R), "float32")  # q, transposed: rows are vector lanes
        o = T.sblock_alloc_buffer((R, D), "float32")
        kf = T.sblock_alloc_buffer((P, D), "float32")
        vf = T.sblock_alloc_buffer((P, D), "float32")
        sc = T.sblock_alloc_buffer((P, R), "float32")  # scores, then weights, of the tile's keys
        acc = T.sblock_alloc_buffer((JT, RW), "float32")
        acc2 = T.sblock_alloc_buffer((RI, CW), "float32")
        lim = T.sblock_alloc_buffer((R,), "int32")  # keys row r sees
        st = T.sblock_alloc_buffer((3, R), "float32")  # running max, running sum, new max
        # the task's first token. Causal rows grow with the token, and the thread pool hands each
        # thread one contiguous range of tasks: tiles are taken in the order first, last, second, ...
        # so that any two neighbouring tasks hold about the same work
        i: T.let[T.int32] = task // H_kv
        t0: T.let[T.int32] = T.if_then_else(i % 2 == 0, i // 2, (qlen + QT - 1) // QT - 1 - i // 2) * QT
        hk: T.let[T.int32] = task % H_kv
        for r in T.serial(R):
            for d in T.serial(D):
                # scores in base 2: exp(s) = exp2(s * log2(e)); tokens past the chunk repeat its last
                qt[d, r] = T.Cast("float32", Q[q0 + T.min(t0 + r // group, qlen - 1),
                                               hk * group + r % group, d]) * sm_scale * T.float32(LOG2E)
            for d in T.vectorized(D):
                o[r, d] = T.float32(0)
            # TVM's _causal_mask: col < kv_len - qo_len + row + 1
            lim[r] = T.if_then_else(causal > 0, T.min(klen, klen - qlen + T.min(t0 + r // group, qlen - 1) + 1), klen)
        for rv in T.serial(R // VL):
            for v in T.vectorized(VL):
                st[0, rv * VL + v] = T.float32(NEG)
                st[1, rv * VL + v] = T.float32(0)
        for kb in T.serial((lim[R - 1] + P - 1) // P):  # up to the keys the last row sees
            # the tile's keys and values in float32 once for all R rows (past `lim[R - 1]`: its last
            # key again, masked below)
            for j in T.serial(P):
                key: T.let[T.int32] = T.min(kb * P + j, lim[R - 1] - 1)
                if PAGED:  # kbase: the sequence's first entry in the page table
                    page: T.let[T.int32] = page_values[kbase + key // PS]
                    for d in T.vectorized(D):
                        kf[j, d] = T.Cast("float32", KV0[page, 0, hk, key % PS, d])
                        vf[j, d] = T.Cast("float32", KV1[page, 1, hk, key % PS, d])
                else:  # kbase: the sequence's first row of k / v
                    for d in T.vectorized(D):
                        kf[j, d] = T.Cast("float32", KV0[kbase + key, hk, d])
                        vf[j, d] = T.Cast("float32", KV1[kbase + key, hk, d])
            for rw in T.serial(R // RW):
                for jc in T.serial(P // JT):
                    # 8-lane vectors spelled out: LLVM widens a 24-lane one and assembles it lane by lane
                    for jj, rv in T.grid(JT, RW // VL):
                        for v in T.vectorized(VL):
                            acc[jj, rv * VL + v] = T.float32(0)
                    for d in T.serial(D):
                        for jj in T.unroll(JT):
                            for rv in T.unroll(RW // VL):
                                for v in T.vectorized(VL):
                                    acc[jj, rv * VL + v] = (acc[jj, rv * VL + v] + kf[jc * JT + jj, d]
                                                            * qt[d, rw * RW + rv * VL + v])
                    for jj, rv in T.grid(JT, RW // VL):
                        for v in T.vectorized(VL):
                            sc[jc * JT + jj, rw * RW + rv * VL + v] = acc[jj, rv * VL + v]
            # online softmax, every row at once (rows are vector lanes)
            for rv in T.serial(R // VL):
                for v in T.vectorized(VL):
                    st[2, rv * VL + v] = st[0, rv * VL + v]
            for j in T.serial(P):
                for rv in T.serial(R // VL):
                    for v in T.vectorized(VL):
                        st[2, rv * VL + v] = T.if_then_else(kb * P + j < lim[rv * VL + v], T.max(st[2, rv * VL + v], sc[j, rv * VL + v]), st[2, rv * VL + v])
            for j in T.serial(P):
                for rv in T.serial(R // VL):
                    for v in T.vectorized(VL):
                        sc[j, rv * VL + v] = T.if_then_else(kb * P + j < lim[rv * VL + v], _exp2(sc[j, rv * VL + v] - st[2, rv * VL + v]), T.float32(0))
            for rv in T.serial(R // VL):
                for v in T.vectorized(VL):
                    st[0, rv * VL + v] = _exp2(st[0, rv * VL + v] - st[2, rv * VL + v])  # the old sums' rescale, for a moment
                    st[1, rv * VL + v] = st[1, rv * VL + v] * st[0, rv * VL + v]
            for j in T.serial(P):
                for rv in T.serial(R // VL):
                    for v in T.vectorized(VL):
                        st[1, rv * VL + v] = st[1, rv * VL + v] + sc[j, rv * VL + v]
            for r in T.serial(R):
                for d in T.vectorized(D):
                    o[r, d] = o[r, d] * st[0, r]
            for rv in T.serial(R // VL):
                for v in T.vectorized(VL):
                    st[0, rv * VL + v] = st[2, rv * VL + v]
            for rc in T.serial(R // RI):
                for dc in T.serial(D // CW):
                    for ri in T.unroll(RI):
                        for c in T.vectorized(CW):
                            acc2[ri, c] = o[rc * RI + ri, dc * CW + c]
                    for j in T.serial(P):
                        for ri in T.unroll(RI):
                            for c in T.vectorized(CW):
                                acc2[ri, c] = acc2[ri, c] + sc[j, rc * RI + ri] * vf[j, dc * CW + c]
                    for ri in T.unroll(RI):
                        for c in T.vectorized(CW):
                            o[rc * RI + ri, dc * CW + c] = acc2[ri, c]
        for r in T.serial(R):
            if t0 + r // group < qlen:
                for d in T.vectorized(D):
                    output[q0 + t0 + r // group, hk * group + r % group, d] = T.Cast(
                        dtype, T.if_then_else(st[1, r] > T.float32(0), o[r, d] / st[1, r], T.float32(0)))
                lse[q0 + t0 + r // group, hk * group + r % group] = (
                    st[0, r] + T.log2(T.max(st[1, r], T.float32(1e-30))))

    if PAGED:
        @T.prim_func(s_tir=True)
        def attn(
            var_q: T.handle,
            var_q_indptr: T.handle,
            var_pages: T.handle,
            var_page_indptr: T.handle,
            var_page_values: T.handle,
            var_length_info: T.handle,
            var_k_rope_pos_offset: T.handle,
            var_q_rope_position: T.handle,
            var_output: T.handle,
            var_lse: T.handle,
            causal: T.int32,
            rotary_mode: T.int32,
            rope_scale: T.float32,
            rope_theta: T.float32,
            sm_scale: T.float32,
        ):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
            batch_size = T.int32()
            qo_len = T.int32()
            nnz_pages = T.int32()
            max_num_pages = T.int32()
            o_qi = T.int32()
            o_pi = T.int32()
            o_pv = T.int32()
            o_kr = T.int32()
            o_qr = T.int32()
            o_len = T.int32()
            Q = T.match_buffer(var_q, (qo_len, H_qo, D), dtype)
            q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=o_qi)
            pages = T.match_buffer(var_pages, (max_num_pages, 2, H_kv, PS, D), dtype)
            page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=o_pi)
            page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=o_pv)
            last_page_len = T.match_buffer(var_length_info, (batch_size,), "int32", elem_offset=o_len)
            k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=o_kr)  # noqa: F841
            q_rope_position = T.match_buffer(var_q_rope_position, (qo_len,), "int32", elem_offset=o_qr)  # noqa: F841
            output = T.match_buffer(var_output, (qo_len, H_qo, D), dtype)
            lse = T.match_buffer(var_lse, (qo_len, H_qo), "float32")
            assert rotary_mode == 0, "prefill_attention_cpu: inline rotary (rotary_mode 1) is not implemented"
            for b in T.serial(batch_size):
                for task in T.parallel((q_indptr[b + 1] - q_indptr[b] + QT - 1) // QT * H_kv):
                    with T.sblock("attn"):
                        T.reads(Q[0:qo_len, 0:H_qo, 0:D], pages[0:max_num_pages, 0:2, 0:H_kv, 0:PS, 0:D],
                                q_indptr[0:batch_size + 1], page_indptr[0:batch_size + 1], page_values[0:nnz_pages],
                                last_page_len[0:batch_size])
                        T.writes(output[0:qo_len, 0:H_qo, 0:D], lse[0:qo_len, 0:H_qo])
                        npages: T.let[T.int32] = page_indptr[b + 1] - page_indptr[b]
                        # the cache's own rule for the key count: full pages and the last page's fill
                        rows_task(Q, pages, pages, page_values, q_indptr[b], q_indptr[b + 1] - q_indptr[b],
                                  T.if_then_else(npages > 0, _get_kv_chunk_len(npages, PS, b, last_page_len, False), 0),
                                  page_indptr[b], task, causal, sm_scale, output, lse)
    else:
        @T.prim_func(s_tir=True)
        def attn(
            var_q: T.handle,
            var_q_indptr: T.handle,
            var_k: T.handle,
            var_v: T.handle,
            var_kv_indptr: T.handle,
            var_q_rope_position: T.handle,
            var_k_rope_pos_offset: T.handle,
            var_output: T.handle,
            var_lse: T.handle,
            causal: T.int32,
            rotary_mode: T.int32,
            rope_scale: T.float32,
            rope_theta: T.float32,
            sm_scale: T.float32,
        ):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
            batch_size = T.int32()
            qo_len = T.int32()
            kv_len = T.int32()
            o_qi = T.int32()
            o_ki = T.int32()
            o_qr = T.int32()
            o_kr = T.int32()
            Q = T.match_buffer(var_q, (qo_len, H_qo, D), dtype)
            q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=o_qi)
            K = T.match_buffer(var_k, (kv_len, H_kv, D), dtype)
            V = T.match_buffer(var_v, (kv_len, H_kv, D), dtype)
            kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=o_ki)
            q_rope_position = T.match_buffer(var_q_rope_position, (qo_len,), "int32", elem_offset=o_qr)  # noqa: F841
            k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=o_kr)  # noqa: F841
            output = T.match_buffer(var_output, (qo_len, H_qo, D), dtype)
            lse = T.match_buffer(var_lse, (qo_len, H_qo), "float32")
            assert rotary_mode == 0, "prefill_attention_cpu: inline rotary (rotary_mode 1) is not implemented"
            for b in T.serial(batch_size):
                for task in T.parallel((q_indptr[b + 1] - q_indptr[b] + QT - 1) // QT * H_kv):
                    with T.sblock("attn"):
                        T.reads(Q[0:qo_len, 0:H_qo, 0:D], K[0:kv_len, 0:H_kv, 0:D], V[0:kv_len, 0:H_kv, 0:D],
                                q_indptr[0:batch_size + 1], kv_indptr[0:batch_size + 1])
                        T.writes(output[0:qo_len, 0:H_qo, 0:D], lse[0:qo_len, 0:H_qo])
                        rows_task(Q, K, V, kv_indptr, q_indptr[b], q_indptr[b + 1] - q_indptr[b],
                                  kv_indptr[b + 1] - kv_indptr[b], kv_indptr[b], task, causal, sm_scale, output, lse)

    return attn


def _accessed_buffers(func) -> dict:
    """name -> Buffer for the buffers that the blocks of `func` declare they read or write (the Python
    API of this TVM has no buffer_map on PrimFunc)."""
    found: dict = {}
    todo = [func.body]
    while todo:
        node = todo.pop()
        block = getattr(node, "block", None)
        if block is not None:
            for region in list(block.reads) + list(block.writes):
                found.setdefault(region.source.name, region.source)
            todo.append(block.body)
        elif hasattr(node, "seq"):
            todo.extend(node.seq)
        elif hasattr(node, "body"):
            todo.append(node.body)
    return found


def attention_pass():
    """Module pass: replace TVM's CPU paged decode attention, ragged prefill attention and paged prefill
    attention (not the sliding-window variants) by decode_attention_cpu / prefill_attention_cpu (shapes read
    from the stock functions' buffers)."""
    import tvm
    from tvm import tirx

    def replacement(name: str, bufs: dict):
        if name == STOCK_DECODE_ATTENTION and {"Q", "pages"} <= set(bufs):
            _, h_qo, _ = bufs["Q"].shape
            _, _, h_kv, page_size, d = bufs["pages"].shape
            return decode_attention_cpu(int(h_qo), int(h_kv), int(d), int(page_size), str(bufs["pages"].dtype))
        if name == STOCK_PREFILL_ATTENTION and {"q", "k", "v"} <= set(bufs) \
                and int(bufs["k"].shape[2]) == int(bufs["v"].shape[2]):
            _, h_qo, d = bufs["q"].shape
            return prefill_attention_cpu(int(h_qo), int(bufs["k"].shape[1]), int(d), str(bufs["q"].dtype))
        if name == STOCK_PAGED_PREFILL_ATTENTION and {"q", "pages"} <= set(bufs):
            _, h_qo, _ = bufs["q"].shape
            _, _, h_kv, page_size, d = bufs["pages"].shape
            return prefill_attention_cpu(int(h_qo), int(h_kv), int(d), str(bufs["q"].dtype), page_size=int(page_size))
        raise RuntimeError(f"{name}: unexpected TVM kernel (buffers {sorted(bufs)}); "
                           f"update export/cpu_schedule.py for this TVM version")

    @tvm.transform.module_pass(opt_level=0, name="CPUAttention")
    def _pass(mod, _ctx):
        for gv, func in list(mod.functions.items()):
            if not isinstance(func, tirx.PrimFunc) or func.attrs is None:
                continue
            name = func.attrs.get("global_symbol")
            if name in (STOCK_DECODE_ATTENTION, STOCK_PREFILL_ATTENTION, STOCK_PAGED_PREFILL_ATTENTION):
                mod[gv] = replacement(name, _accessed_buffers(func)).with_attr("global_symbol", name)
        return mod

    return _pass


def cpu_pipeline(target):
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
    from tvm.s_tir import dlight as dl

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                [attention_pass()]
                + cpu_generic.library_dispatch_passes(target)
                + [
                    relax.transform.LegalizeOps(),
                    relax.transform.AnnotateTIROpPattern(),
                    relax.transform.FoldConstant(),
                    relax.transform.FuseOps(),
                    relax.transform.FuseTIR(),
                    dl.ApplyDefaultSchedule(*_rules()[:2], dl.cpu.Reduction(), _rules()[2]),
                ]
                + cpu_generic.dataflow_lower_passes(target)
                + cpu_generic.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline
