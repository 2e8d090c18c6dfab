"""Split-KV decode attention over TVM's paged KV cache (flash-decoding), batch >= 1, one query token.

Why (measured, benchmarks/results/profile_before_h200.json): TVM's stock TIR decode kernel gives each
(sequence, kv head) ONE thread block that walks the whole context. At batch 1 that is 32 blocks for a
7B model (3 for SmolLM2) on a 132-SM GPU: 32 us per layer at 512 tokens of context for 7B, 23 us for
SmolLM2, a third of the 7B decode step and half of SmolLM2's. Here the context is also split over
`splits` blocks per head: each block runs an online softmax over its slice and writes its partial
output and log-sum-exp to a workspace, and a second kernel merges the slices.

Same signature and conventions as TVM's `batch_decode_paged_kv` (the paged KV cache calls it through
its function table): q [B, H_qo, D], pages [P, 2, H_kv, page_size, D], page table (indptr, values),
last-page lengths [B], output [B, H_qo, D], lse [B, H_qo] in log2 units. The variant for sliding-window
layers (`sliding_window=True`, Gemma3's local layers) takes TVM's length_info [3, B] instead: last-page
length, the window's offset into its first page, sink tokens; attended token j sits at slot j + offset
past the sink, as in TVM's kernel. Rotary embedding is applied before keys enter the cache
(RopeMode.NORMAL / NONE), so the rope arguments are accepted and unused; `applies_to(rope_mode)` says
so for the caller.

Layout of a block (sequence b, kv head h, slice c): lanes tx split the head dim in `vec`-wide pieces
(each K/V row is one coalesced load across the lanes), ty is the query head within the GQA group (the
group shares the K/V rows), tz walks tokens in parallel; the bdz partial states merge in shared memory.
The merge kernel gives each VEC-wide piece of a head one warp, whose lanes hold one slice each: all partials
load at once and combine by warp shuffles.
"""
from __future__ import annotations

import math

import numpy as np

from tvm_kernels.errors import UserError
from tvm_kernels.targets import DeviceTarget, get_target

LOG2E = math.log2(math.e)


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, sm_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """One sequence: q [H_qo, D], k/v [L, H_kv, D] -> (out [H_qo, D] float32, lse [H_qo] in log2 units)."""
    H_qo, H_kv = q.shape[0], k.shape[1]
    g = H_qo // H_kv
    kk = np.repeat(k.astype(np.float32), g, axis=1)  # [L, H_qo, D]
    vv = np.repeat(v.astype(np.float32), g, axis=1)
    s = np.einsum("hd,lhd->hl", q.astype(np.float32), kk) * sm_scale * LOG2E
    m = s.max(axis=1, keepdims=True)
    p = np.exp2(s - m)
    out = np.einsum("hl,lhd->hd", p, vv) / p.sum(axis=1, keepdims=True)
    return out, (m[:, 0] + np.log2(p.sum(axis=1)))


def applies_to(rope_mode: int) -> bool:
    """The kernel reads keys as stored: right for RoPE applied before the cache (RopeMode.NORMAL) or no
    RoPE (NONE), wrong for INLINE, where the attention kernel itself would rotate q and k."""
    from tvm.relax.frontend.nn.llm.kv_cache import RopeMode

    return int(rope_mode) != int(RopeMode.INLINE)


# The merge's warps per block (each a VEC-wide piece of one head). Side by side on the H100
# (decode_attn_merge_ab_h100.json), against the loop over slices in one thread: SmolLM2 x1.05 / 1.05 / 1.03 at
# 128 / 512 / 2048 tokens with 1 warp, x1.06 / 1.06 / 1.04 with 4, x1.04 with a whole head per block; the 7B
# x1.00 / 1.00 / 0.99 with 1, x0.99 with 4, x0.98-0.99 with a whole head.
MERGE_PIECES = 1


def config(num_qo_heads: int, num_kv_heads: int, head_dim: int, target: DeviceTarget) -> dict[str, int]:
    if num_kv_heads <= 0 or num_qo_heads % num_kv_heads:
        raise UserError(f"decode attention: {num_qo_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    vec = 4 if head_dim % 4 == 0 and head_dim // 4 <= 32 else 8
    if head_dim % vec or head_dim // vec > 32:
        raise UserError(f"decode attention: head_dim {head_dim} is not supported (multiples of 4 up to 256)")
    bdx = head_dim // vec
    bdy = num_qo_heads // num_kv_heads
    if bdx * bdy > 512:
        raise UserError(f"decode attention: a GQA group of {bdy} heads x {bdx} lanes exceeds 512 threads")
    # A block's time is a chain of dependent global loads, one per loop step, so bdz token streams run
    # side by side, and the context is cut into as many slices as keep ~4 blocks per SM at batch 1
    # (capped: the merge reads every slice). GQA groups (bdy > 1) get up to 512 threads: each K/V row
    # feeds bdy heads there. Swept on the H100 (decode_attn_sweep_h100.json, two runs): SmolLM2's 3 KV
    # heads x 3 queries run 10-30% faster with 10 streams than with 5; for 7B (MHA) 8 streams of 256
    # threads stay best and 16 streams are erratic.
    bdz = max(1, (512 if bdy > 1 else 256) // (bdx * bdy))
    splits = max(1, min(32, -(-4 * target.num_sms // num_kv_heads)))
    # the merge's blocks: up to MERGE_PIECES VEC-wide pieces of a head (a warp each)
    pieces = max(p for p in range(1, min(bdx, MERGE_PIECES) + 1) if bdx % p == 0)
    return {"vec": vec, "bdx": bdx, "bdy": bdy, "bdz": bdz, "splits": splits, "merge_pieces": pieces}


def decode_attention(num_kv_heads: int, num_qo_heads: int, head_dim: int, target: "str | DeviceTarget",
                     page_size: int = 16, dtype: str = "float16", override: dict[str, int] | None = None,
                     sliding_window: bool = False):
    """The PrimFunc (CUDA targets; the CPU keeps TVM's kernels). `sliding_window`: the variant the cache calls
    for sliding-window layers (length_info [3, B]). `override`: bdz / splits / merge_pieces replacing
    `config`'s (benchmark sweeps and tests only)."""
    from tvm.script import tirx as T

    dt = get_target(target)
    if not dt.is_cuda:
        raise UserError(f"decode attention: {dt.name} is not a CUDA target")
    c = {**config(num_qo_heads, num_kv_heads, head_dim, dt), **(override or {})}
    VEC, bdx, bdy, bdz, NS, TOK = c["vec"], c["bdx"], c["bdy"], c["bdz"], c["splits"], 2  # TOK: the 2-value reduce below
    MP = c["merge_pieces"]
    if bdx % MP:
        raise UserError(f"decode attention: merge_pieces {MP} must divide the {bdx} pieces of a head")
    H_qo, H_kv, D, G = num_qo_heads, num_kv_heads, head_dim, num_qo_heads // num_kv_heads
    NEG = -5e4  # as TVM's kernels: finite, so exp2(NEG - m) underflows to 0 without inf - inf
    # vector loops run 4 lanes at a time: CUDA has no 8-lane fp32 type, and TVM's codegen cannot emit an
    # 8-lane fp16 load into a local array (head_dim 256, e.g. Gemma3, takes VEC = 8)
    LV = min(VEC, 4)
    SW = bool(sliding_window)
    NJ = -(-NS // 32)  # slices per lane in the merge
    # the cache's own length and token-to-slot rules, so this kernel attends exactly where TVM's would
    from tvm.relax.frontend.nn.llm._kernel_common import _get_kv_chunk_len, _get_seq_offset

    @T.prim_func(s_tir=True)
    def batch_decode_paged_kv_split(
        q_handle: T.handle, pages_handle: T.handle, indptr_handle: T.handle, values_handle: T.handle,
        length_handle: T.handle, k_rope_offset_handle: T.handle, q_rope_position_handle: T.handle,
        output_handle: T.handle, lse_handle: T.handle, rotary_mode: T.int32, rope_scale: T.float32,
        rope_theta: T.float32, sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "awq_edge.kernel": "decode_attention"})
        B = T.int32()
        nnz_pages = T.int32()
        max_pages = T.int32()
        pages_off = T.int64()
        indptr_off = T.int32()
        values_off = T.int32()
        length_off = T.int32()
        k_rope_off = T.int32()
        q_rope_off = T.int32()
        Q = T.match_buffer(q_handle, (B, H_qo, D), dtype)
        # offset_factor: a layer's pages start at a multiple of a page (vector loads need to know it)
        pages = T.match_buffer(pages_handle, (max_pages, 2, H_kv, page_size, D), dtype, elem_offset=pages_off,
                               offset_factor=page_size * D)
        indptr = T.match_buffer(indptr_handle, (B + 1,), "int32", elem_offset=indptr_off)
        values = T.match_buffer(values_handle, (nnz_pages,), "int32", elem_offset=values_off)
        k_rope_offset = T.match_buffer(k_rope_offset_handle, (B,), "int32", elem_offset=k_rope_off)  # noqa: F841
        q_rope_position = T.match_buffer(q_rope_position_handle, (B,), "int32", elem_offset=q_rope_off)  # noqa: F841
        output = T.match_buffer(output_handle, (B, H_qo, D), dtype)
        lse = T.match_buffer(lse_handle, (B, H_qo), "float32")
        length_info = T.match_buffer(length_handle, (3, B) if SW else (B,), "int32", elem_offset=length_off)

        assert rotary_mode == 0, "decode_attention: rotary embedding must be applied before attention (RopeMode NORMAL/NONE)"
        with T.sblock("root"):
            part_o = T.sblock_alloc_buffer((B, H_qo, NS, D), "float32")
            part_lse = T.sblock_alloc_buffer((B, H_qo, NS), "float32")
            for bx in T.thread_binding(B, thread="blockIdx.x"):
                for by in T.thread_binding(H_kv, thread="blockIdx.y"):
                    for bz in T.thread_binding(NS, thread="blockIdx.z"):
                        for ty in T.thread_binding(bdy, thread="threadIdx.y"):
                            for tx in T.thread_binding(bdx, thread="threadIdx.x"):
                                for tz in T.thread_binding(bdz, thread="threadIdx.z"):
                                    with T.sblock("slice"):
                                        q_loc = T.sblock_alloc_buffer((VEC,), "float32", scope="local")
                                        o_loc = T.sblock_alloc_buffer((VEC,), "float32", scope="local")
                                        k_loc = T.sblock_alloc_buffer((TOK, VEC), dtype, scope="local")
                                        v_loc = T.sblock_alloc_buffer((TOK, VEC), dtype, scope="local")
                                        dot = T.sblock_alloc_buffer((TOK,), "float32", scope="local")
                                        red0 = T.sblock_alloc_buffer((1,), "float32", scope="local")
                                        red1 = T.sblock_alloc_buffer((1,), "float32", scope="local")
                                        score = T.sblock_alloc_buffer((TOK,), "float32", scope="local")
                                        m_prev = T.sblock_alloc_buffer((1,), "float32", scope="local")
                                        st = T.sblock_alloc_buffer((2,), "float32", scope="local")  # m, d
                                        span = T.sblock_alloc_buffer((3,), "int32", scope="local")  # lo, hi, len
                                        o_sh = T.sblock_alloc_buffer((bdz, bdy, D), "float32", scope="shared")
                                        md_sh = T.sblock_alloc_buffer((bdz, bdy, 2), "float32", scope="shared")
                                        head: T.let[T.int32] = by * G + ty
                                        begin: T.let[T.int32] = indptr[bx]
                                        end: T.let[T.int32] = indptr[bx + 1]
                                        span[2] = T.if_then_else(begin != end, _get_kv_chunk_len(end - begin, page_size, bx, length_info, SW), 0)
                                        per: T.let[T.int32] = T.ceildiv(span[2], NS)
                                        span[0] = T.min(bz * per, span[2])
                                        span[1] = T.min(span[0] + per, span[2])
                                        st[0] = T.float32(NEG)
                                        st[1] = T.float32(1)
                                        for i0 in T.unroll(VEC // LV):
                                            for i1 in T.vectorized(LV):
                                                q_loc[i0 * LV + i1] = T.Cast("float32", Q[bx, head, tx * VEC + i0 * LV + i1]) * sm_scale * T.float32(LOG2E)
                                                o_loc[i0 * LV + i1] = T.float32(0)
                                        for it in T.serial(T.ceildiv(span[1] - span[0], bdz * TOK)):
                                            # TOK rows per thread: their loads are issued together, then used
                                            for j in T.unroll(TOK):
                                                pos: T.let[T.int32] = span[0] + (it * bdz + tz) * TOK + j
                                                # past the slice: read its last row again (an address that exists), mask the score
                                                off: T.let[T.int32] = _get_seq_offset(T.min(pos, span[1] - 1), bx, length_info, SW)
                                                page: T.let[T.int32] = values[begin + T.floordiv(off, page_size)]
                                                slot: T.let[T.int32] = T.floormod(off, page_size)
                                                for i0 in T.unroll(VEC // LV):
                                                    for i1 in T.vectorized(LV):
                                                        k_loc[j, i0 * LV + i1] = pages[page, 0, by, slot, tx * VEC + i0 * LV + i1]
                                                for i0 in T.unroll(VEC // LV):
                                                    for i1 in T.vectorized(LV):
                                                        v_loc[j, i0 * LV + i1] = pages[page, 1, by, slot, tx * VEC + i0 * LV + i1]
                                            for j in T.unroll(TOK):
                                                dot[j] = T.float32(0)
                                                for i in T.unroll(VEC):
                                                    dot[j] = dot[j] + q_loc[i] * T.Cast("float32", k_loc[j, i])
                                            with T.sblock("lanes_sum"):  # both rows' dot products in one pass over the lanes
                                                T.reads(dot[0:2])
                                                T.writes(red0[0], red1[0])
                                                T.attr(T.comm_reducer(lambda a0, a1, b0, b1: (a0 + b0, a1 + b1), [T.float32(0), T.float32(0)]),
                                                       "reduce_scope", T.int32(0))
                                                T.tvm_thread_allreduce(T.uint32(2), dot[0], dot[1], True, red0[0], red1[0], tx, dtype="void")
                                            score[0] = red0[0]
                                            score[1] = red1[0]
                                            for j in T.unroll(TOK):
                                                score[j] = T.if_then_else(span[0] + (it * bdz + tz) * TOK + j < span[1], score[j], T.float32(NEG))
                                            m_prev[0] = st[0]
                                            for j in T.unroll(TOK):
                                                st[0] = T.max(st[0], score[j])
                                            keep: T.let[T.float32] = T.exp2(m_prev[0] - st[0])
                                            st[1] = st[1] * keep
                                            for i in T.unroll(VEC):
                                                o_loc[i] = o_loc[i] * keep
                                            for j in T.unroll(TOK):
                                                score[j] = T.exp2(score[j] - st[0])
                                                st[1] = st[1] + score[j]
                                                for i in T.unroll(VEC):
                                                    o_loc[i] = o_loc[i] + score[j] * T.Cast("float32", v_loc[j, i])
                                        # merge the bdz token streams of this block
                                        for i0 in T.unroll(VEC // LV):
                                            for i1 in T.vectorized(LV):
                                                o_sh[tz, ty, tx * VEC + i0 * LV + i1] = o_loc[i0 * LV + i1]
                                        md_sh[tz, ty, 0] = st[0]
                                        md_sh[tz, ty, 1] = st[1]
                                        T.tvm_storage_sync("shared")
                                        st[0] = T.float32(NEG)
                                        for j in T.serial(bdz):
                                            st[0] = T.max(st[0], md_sh[j, ty, 0])
                                        st[1] = T.float32(0)
                                        for i in T.unroll(VEC):
                                            o_loc[i] = T.float32(0)
                                        for j in T.serial(bdz):
                                            w: T.let[T.float32] = T.exp2(md_sh[j, ty, 0] - st[0])
                                            st[1] = st[1] + md_sh[j, ty, 1] * w
                                            for i in T.unroll(VEC):
                                                o_loc[i] = o_loc[i] + o_sh[j, ty, tx * VEC + i] * w
                                        if tz == 0:
                                            for i0 in T.unroll(VEC // LV):
                                                for i1 in T.vectorized(LV):
                                                    part_o[bx, head, bz, tx * VEC + i0 * LV + i1] = o_loc[i0 * LV + i1] / st[1]
                                            part_lse[bx, head, bz] = st[0] + T.log2(st[1])
            # Merge: one warp per (head, VEC-wide piece of the head dim), one slice per lane (NJ per lane past 32),
            # so every partial is loaded at once and the max / sums are warp shuffles: a loop over the slices in
            # one thread was a chain of dependent L2 round trips (SmolLM2: 2.5 us of a ~20 us layer, 5% of a step).
            for bx in T.thread_binding(B, thread="blockIdx.x"):
                for h in T.thread_binding(H_qo, thread="blockIdx.y"):
                    for pz in T.thread_binding(bdx // MP, thread="blockIdx.z"):
                        for py in T.thread_binding(MP, thread="threadIdx.y"):
                            for lane in T.thread_binding(32, thread="threadIdx.x"):
                                with T.sblock("merge"):
                                    ty: T.let[T.int32] = pz * MP + py
                                    pl = T.sblock_alloc_buffer((NJ,), "float32", scope="local")
                                    po = T.sblock_alloc_buffer((NJ, VEC), "float32", scope="local")
                                    acc = T.sblock_alloc_buffer((VEC,), "float32", scope="local")
                                    mx = T.sblock_alloc_buffer((2,), "float32", scope="local")  # max lse, sum of weights
                                    for jj in T.unroll(NJ):
                                        # lanes past the last slice read it again (an address that exists), weight 0 below
                                        pl[jj] = part_lse[bx, h, T.min(jj * 32 + lane, NS - 1)]
                                        for i0 in T.unroll(VEC // LV):
                                            for i1 in T.vectorized(LV):
                                                po[jj, i0 * LV + i1] = part_o[bx, h, T.min(jj * 32 + lane, NS - 1),
                                                                              ty * VEC + i0 * LV + i1]
                                    mx[0] = pl[0]
                                    for jj in T.unroll(1, NJ):
                                        mx[0] = T.max(mx[0], pl[jj])
                                    for sh in T.unroll(5):
                                        mx[0] = T.max(mx[0], T.tvm_warp_shuffle_xor(
                                            T.tvm_warp_activemask(), mx[0], T.shift_right(32, sh + 1), 32, 32))
                                    mx[1] = T.float32(0)
                                    for i in T.unroll(VEC):
                                        acc[i] = T.float32(0)
                                    for jj in T.unroll(NJ):
                                        w: T.let[T.float32] = T.if_then_else(jj * 32 + lane < NS, T.exp2(pl[jj] - mx[0]), T.float32(0))
                                        mx[1] = mx[1] + w
                                        for i in T.unroll(VEC):
                                            acc[i] = acc[i] + w * po[jj, i]
                                    for sh in T.unroll(5):
                                        mx[1] = mx[1] + T.tvm_warp_shuffle_xor(
                                            T.tvm_warp_activemask(), mx[1], T.shift_right(32, sh + 1), 32, 32)
                                        for i in T.unroll(VEC):
                                            acc[i] = acc[i] + T.tvm_warp_shuffle_xor(
                                                T.tvm_warp_activemask(), acc[i], T.shift_right(32, sh + 1), 32, 32)
                                    if lane == 0:
                                        for i0 in T.unroll(VEC // LV):
                                            for i1 in T.vectorized(LV):
                                                output[bx, h, ty * VEC + i0 * LV + i1] = T.Cast(dtype, acc[i0 * LV + i1] / mx[1])
                                        if ty == 0:
                                            lse[bx, h] = mx[0] + T.log2(mx[1])

    # the cache builds both variants into every module, so they need names of their own
    return batch_decode_paged_kv_split.with_attr("global_symbol", "batch_decode_paged_kv_split" + ("_window" if SW else ""))
