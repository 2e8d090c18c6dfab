"""Causal prefill attention on tensor cores (WMMA 16x16x16, fp16 in, fp32 accumulate), ragged batch.

Why (measured, benchmarks/results/profile_decode_h200.json, `prefill` lists): TVM's stock ragged prefill
kernel computes both products with CUDA-core FMAs, walks every key tile even where the causal mask hides
all of it, and launches 16 blocks per KV head (48 blocks for SmolLM2 on a 132-SM GPU). A 512-token
prompt spent 11.4 ms in it for a 7B model (a quarter of the time to first token) and 11.6 ms for
SmolLM2 (80% of its prefill).

Here a block owns BM = 16 x warps query rows of one KV head (rows are (token, head of the GQA group)
pairs, as in TVM's kernel, so a group shares every K/V tile it loads) and walks only the key tiles its
last row can see. Per key tile each warp computes its 16 x BN scores with WMMA into shared memory, runs
the online softmax on them (two lanes per row, each lane half the columns), writes P in fp16, and
multiplies P by V with WMMA; the output accumulator lives in registers as (row, 8 columns per 16-column
fragment) per lane, because a WMMA accumulator cannot be rescaled row by row when the running max moves.

Same signature and conventions as TVM's `batch_prefill_ragged_kv` (the paged KV cache calls it through
its function table): q [Lq, H_qo, D], q_indptr [B+1], k/v [Lk, H_kv, D], kv_indptr [B+1], output
[Lq, H_qo, D], lse [Lq, H_qo] in log2 units; causal means query i of a sequence sees keys
j < kv_len - qo_len + i + 1. Rotary embedding must already be applied (RopeMode NORMAL / NONE); the rope
arguments are accepted and unused (`decode_attention.applies_to` decides, as for decode).

Built with `page_size`, the same block reads K/V from the paged cache instead, with the signature of
TVM's `batch_prefill_paged_kv` (length info = last-page lengths, no sliding window): the cache calls it for
a chunk's queries against the tokens cached before it. TVM's kernel there took a 200-token turn after 1500
cached tokens to 36 ms for SmolLM2 (2.5 ms with no history) and 90 ms for the 7B; this one 6.2 / 21.5 ms
(benchmarks/results/e2e_gpu_turn_h100.json).
"""
from __future__ import annotations

import math

import numpy as np

from tvm_kernels.errors import UserError
from tvm_kernels.targets import DeviceTarget, get_target

LOG2E = math.log2(math.e)


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, sm_scale: float, causal: bool = True
              ) -> tuple[np.ndarray, np.ndarray]:
    """One sequence: q [Lq, H_qo, D], k/v [Lk, H_kv, D] (Lk >= Lq; the queries are the last Lq positions)
    -> (out [Lq, H_qo, D] float32, lse [Lq, H_qo] in log2 units)."""
    Lq, H_qo, _ = q.shape
    Lk, H_kv, _ = k.shape
    g = H_qo // H_kv
    kk = np.repeat(k.astype(np.float32), g, axis=1)
    vv = np.repeat(v.astype(np.float32), g, axis=1)
    s = np.einsum("qhd,khd->hqk", q.astype(np.float32), kk) * sm_scale * LOG2E
    if causal:
        visible = np.arange(Lk)[None, :] < (Lk - Lq + np.arange(Lq) + 1)[:, None]
        s = np.where(visible[None], s, -np.inf)
    m = s.max(axis=2, keepdims=True)
    p = np.exp2(s - m)
    out = np.einsum("hqk,khd->qhd", p, vv) / p.sum(axis=2)[..., None].transpose(1, 0, 2)
    return out, (m[..., 0] + np.log2(p.sum(axis=2))).T


def supports(num_qo_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Shapes this kernel is built for: head_dim a multiple of 16 up to 128 (the output accumulator lives in
    registers, 8 values per 16 columns per lane; at 256 it would spill). Others (Gemma3's 256) keep TVM's."""
    return num_kv_heads > 0 and num_qo_heads % num_kv_heads == 0 and head_dim % 16 == 0 and 16 <= head_dim <= 128


def config(num_qo_heads: int, num_kv_heads: int, head_dim: int, target: DeviceTarget) -> dict[str, int]:
    if num_kv_heads <= 0 or num_qo_heads % num_kv_heads:
        raise UserError(f"prefill attention: {num_qo_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    if not supports(num_qo_heads, num_kv_heads, head_dim):
        raise UserError(f"prefill attention: head_dim {head_dim} is not supported (multiples of 16 up to 128)")
    if target.arch and int(target.arch.split("_")[1].rstrip("a")) < 80:
        raise UserError(f"prefill attention: {target.name} ({target.arch}) has no fp16 tensor cores of sm_80 and newer")
    warps = 4
    bm = 16 * warps

    def smem(bn, oj):
        # K and V tiles (fp16, rows padded by 8 halves so WMMA rows start on other banks; the Q tile is
        # staged through the same rows first), per-warp scores (fp32), P (fp16), O staging (fp32)
        return 2 * bn * (head_dim + 8) * 2 + warps * 16 * ((bn + 4) * 4 + (bn + 8) * 2 + (16 * oj + 4) * 4)

    # at most 48 KB in all, so no opt-in is needed on any target. The fp16 tiles are static and the fp32
    # ones dynamic (see the kernel): with every tile in one merged dynamic buffer TVM's sync planner sees
    # a single array and puts a block barrier between every pair of fragment loads and stores
    fits = [(bn, oj) for bn in (64, 32) for oj in (4, 2, 1)
            if 2 * bn >= bm and (head_dim // 16) % oj == 0 and smem(bn, oj) <= 48 * 1024]
    if not fits:
        raise UserError(f"prefill attention: head_dim {head_dim} does not fit 48 KB of shared memory")
    bn, oj = max(fits, key=lambda c: (c[1] >= 2, c[0], c[1]))
    return {"warps": warps, "bm": bm, "bn": bn, "oj": oj, "smem_bytes": smem(bn, oj)}


def prefill_attention(num_kv_heads: int, num_qo_heads: int, head_dim: int, target: "str | DeviceTarget",
                      dtype: str = "float16", page_size: int | None = None):
    """The PrimFunc (CUDA sm_80+ targets, fp16, full causal or non-causal attention over ragged q/k/v). With
    `page_size`: the same kernel over the paged cache, with the signature of TVM's `batch_prefill_paged_kv`
    (no sliding window): a chunk's queries against the tokens cached before it (a follow-up chat turn, a
    long prompt's next chunk), where the cache would run TVM's CUDA-core kernel."""
    from tvm.relax.frontend.nn.llm._kernel_common import _get_kv_chunk_len
    from tvm.script import tirx as T

    dt = get_target(target)
    if not dt.is_cuda:
        raise UserError(f"prefill attention: {dt.name} is not a CUDA target")
    if dtype != "float16":
        raise UserError(f"prefill attention: dtype {dtype} is not supported (float16)")
    c = config(num_qo_heads, num_kv_heads, head_dim, dt)
    NW, BM, BN, OJ = c["warps"], c["bm"], c["bn"], c["oj"]
    H_qo, H_kv, D, G = num_qo_heads, num_kv_heads, head_dim, num_qo_heads // num_kv_heads
    DP, SP, PP, OP = D + 8, BN + 4, BN + 8, 16 * OJ + 4  # padded row strides (WMMA ldm: 16-byte multiples)
    DF, NF = D // 16, BN // 16  # 16-wide fragments along the head dim / the key tile
    HALF_N = BN // 2  # score columns per lane (two lanes per row)
    VEC = 8  # fp16 per 16-byte load
    NEG = -5e4  # finite "minus infinity" as TVM's kernels: exp2(NEG - m) underflows to 0, no inf - inf
    PAGED, PS = page_size is not None, page_size or 1
    # the pages' element offset is 64-bit (a whole cache can pass 2^31 halves), and TVM's CUDA codegen cannot
    # emit an 8-half load at such an index (it stops with an error): 4 at a time there, which it emits as four
    # 2-byte loads (as it does for decode_attention's pages)
    KV_VEC = 4

    def kv_length(kvi, lpl, seq, base):
        """The sequence's key count: from its k / v row range, or PAGED its pages and last page's fill (the
        cache's own rule, as decode_attention uses it)."""
        if PAGED:
            n = kvi[seq + 1] - base
            return T.if_then_else(n > 0, _get_kv_chunk_len(n, PS, seq, lpl, False), 0)
        return kvi[seq + 1] - base

    @T.macro
    def attend(q, q_indptr, KV0, KV1, pv, kvi, lpl, output, lse, causal, sm_scale, B, Lq, bx, by, ty, tx):
        """One block's work: k / v rows (KV0, KV1; kvi = kv_indptr), or PAGED the cache's pages (KV0 = KV1 =
        pages, pv = page values, kvi = page indptr, lpl = last page lengths)."""
        KVs = T.sblock_alloc_buffer((2 * BN, DP), dtype, scope="shared")  # K rows, then V rows
        # fp32 tiles in dynamic shared memory: StorageRewrite would pack them with the fp16 tiles into one
        # static array and break the typed pointers the WMMA calls take
        Ss = T.sblock_alloc_buffer((NW, 16, SP), "float32", scope="shared.dyn")
        Ps = T.sblock_alloc_buffer((NW, 16, PP), dtype, scope="shared")
        Os = T.sblock_alloc_buffer((NW, 16, OP), "float32", scope="shared.dyn")
        Qf = T.sblock_alloc_buffer((16, D), dtype, scope="wmma.matrix_a")
        Kf = T.sblock_alloc_buffer((16, 16), dtype, scope="wmma.matrix_b")
        Pf = T.sblock_alloc_buffer((16, BN), dtype, scope="wmma.matrix_a")
        Vf = T.sblock_alloc_buffer((16, 16), dtype, scope="wmma.matrix_b")
        Sacc = T.sblock_alloc_buffer((16, BN), "float32", scope="wmma.accumulator")
        Oacc = T.sblock_alloc_buffer((16, 16 * OJ), "float32", scope="wmma.accumulator")
        o_reg = T.sblock_alloc_buffer((DF * 8,), "float32", scope="local")
        p_reg = T.sblock_alloc_buffer((HALF_N,), "float32", scope="local")
        o_h = T.sblock_alloc_buffer((8,), dtype, scope="local")
        st = T.sblock_alloc_buffer((4,), "float32", scope="local")  # m, l, tile max, tile sum
        walk = T.sblock_alloc_buffer((3,), "int32", scope="local")  # seq, tile in seq, tiles before

        # heaviest tiles (last rows: most keys under the causal mask) start first
        tile: T.let[T.int32] = T.ceildiv(Lq * G, BM) + B - 1 - bx
        walk[0] = -1
        walk[2] = 0
        for b in T.serial(B):
            n_b: T.let[T.int32] = T.ceildiv((q_indptr[b + 1] - q_indptr[b]) * G, BM)
            if walk[0] < 0 and tile < walk[2] + n_b:
                walk[0] = b
                walk[1] = tile - walk[2]
            walk[2] = walk[2] + n_b
        if T.tvm_thread_invariant(walk[0] >= 0):  # block-uniform: syncs inside are safe
            seq: T.let[T.int32] = walk[0]
            q_base: T.let[T.int32] = q_indptr[seq]
            qo_len: T.let[T.int32] = q_indptr[seq + 1] - q_base
            kv_base: T.let[T.int32] = kvi[seq]  # the first k / v row, or PAGED the first page-table entry
            kv_len: T.let[T.int32] = kv_length(kvi, lpl, seq, kv_base)
            row0: T.let[T.int32] = walk[1] * BM
            last_tok: T.let[T.int32] = (T.min(row0 + BM, qo_len * G) - 1) // G
            kv_end: T.let[T.int32] = T.if_then_else(
                causal > 0, T.min(kv_len, kv_len - qo_len + last_tok + 1), kv_len)
            lane_row: T.let[T.int32] = tx // 2  # this lane's row within its warp's 16
            hsel: T.let[T.int32] = tx % 2
            my_row: T.let[T.int32] = row0 + ty * 16 + lane_row
            my_tok: T.let[T.int32] = my_row // G
            # keys this lane's row may see (padding rows past the prompt: all, keeps them finite)
            my_limit: T.let[T.int32] = T.min(kv_len, T.if_then_else(
                causal > 0, kv_len - qo_len + my_tok + 1, kv_len))
            # Q tile -> shared (the K/V rows, free until the walk) -> fragments kept for the walk
            for it in T.serial(T.ceildiv(BM * D // VEC, NW * 32)):
                eq: T.let[T.int32] = (it * NW * 32 + ty * 32 + tx) * VEC
                rq: T.let[T.int32] = eq // D
                cq: T.let[T.int32] = eq % D
                if rq < BM:
                    if (row0 + rq) // G < qo_len:
                        for i in T.vectorized(VEC):
                            KVs[rq, cq + i] = q[q_base + (row0 + rq) // G, by * G + (row0 + rq) % G, cq + i]
                    else:
                        for i in T.vectorized(VEC):
                            KVs[rq, cq + i] = T.float16(0)
            T.tvm_storage_sync("shared")
            for kf in T.serial(DF):
                T.tvm_load_matrix_sync(Qf.data, 16, 16, 16, kf,
                                       KVs.access_ptr("r", offset=(ty * 16) * DP + kf * 16),
                                       DP, "row_major", dtype="void")
            st[0] = T.float32(NEG)
            st[1] = T.float32(0)
            for i in T.serial(DF * 8):
                o_reg[i] = T.float32(0)
            for kt in T.serial(T.ceildiv(kv_end, BN)):
                kv0: T.let[T.int32] = kt * BN
                T.tvm_storage_sync("shared")  # every warp is done with the last K/V tile
                for it in T.serial(T.ceildiv(BN * D // VEC, NW * 32)):
                    e: T.let[T.int32] = (it * NW * 32 + ty * 32 + tx) * VEC
                    r: T.let[T.int32] = e // D
                    col: T.let[T.int32] = e % D
                    if r < BN:
                        if kv0 + r < kv_len:
                            if PAGED:  # KV0 = KV1 = the pages, pv the page table from kv_base
                                page: T.let[T.int32] = pv[kv_base + (kv0 + r) // PS]
                                for kv_ in T.unroll(2):
                                    for i0 in T.unroll(VEC // KV_VEC):
                                        for i1 in T.vectorized(KV_VEC):
                                            KVs[kv_ * BN + r, col + i0 * KV_VEC + i1] = KV0[
                                                page, kv_, by, (kv0 + r) % PS, col + i0 * KV_VEC + i1]
                            else:
                                for i in T.vectorized(VEC):
                                    KVs[r, col + i] = KV0[kv_base + kv0 + r, by, col + i]
                                for i in T.vectorized(VEC):
                                    KVs[BN + r, col + i] = KV1[kv_base + kv0 + r, by, col + i]
                        else:  # zeros, not garbage: P = 0 times NaN would still be NaN
                            for i in T.vectorized(VEC):
                                KVs[r, col + i] = T.float16(0)
                            for i in T.vectorized(VEC):
                                KVs[BN + r, col + i] = T.float16(0)
                T.tvm_storage_sync("shared")
                # S = Q K^T for this warp's 16 rows: K [BN, D] row-major is K^T column-major
                for nf in T.serial(NF):
                    T.tvm_fill_fragment(Sacc.data, 16, 16, 16, nf, T.float32(0), dtype="void")
                    for kf in T.serial(DF):
                        T.tvm_load_matrix_sync(Kf.data, 16, 16, 16, 0,
                                               KVs.access_ptr("r", offset=(nf * 16) * DP + kf * 16),
                                               DP, "col_major", dtype="void")
                        T.tvm_mma_sync(Sacc.data, nf, Qf.data, kf, Kf.data, 0, Sacc.data, nf, dtype="void")
                    T.tvm_store_matrix_sync(Sacc.data, 16, 16, 16, nf,
                                            Ss.access_ptr("w", offset=ty * 16 * SP + nf * 16),
                                            SP, "row_major", dtype="void")
                T.tvm_storage_sync("shared")
                # online softmax: lanes 2r and 2r+1 hold row r's two column halves
                st[2] = T.float32(NEG)
                for j in T.serial(HALF_N):
                    p_reg[j] = T.if_then_else(
                        kv0 + hsel * HALF_N + j < my_limit,
                        Ss[ty, lane_row, hsel * HALF_N + j] * sm_scale * T.float32(LOG2E),
                        T.float32(NEG))
                    st[2] = T.max(st[2], p_reg[j])
                st[2] = T.max(st[2], T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), st[2], 1, 32, 32))
                m_new: T.let[T.float32] = T.max(st[0], st[2])
                alpha: T.let[T.float32] = T.exp2(st[0] - m_new)
                st[3] = T.float32(0)
                for j in T.serial(HALF_N):
                    p_reg[j] = T.if_then_else(kv0 + hsel * HALF_N + j < my_limit,
                                              T.exp2(p_reg[j] - m_new), T.float32(0))
                    st[3] = st[3] + p_reg[j]
                for j0 in T.serial(HALF_N // 8):
                    for j1 in T.vectorized(8):
                        Ps[ty, lane_row, hsel * HALF_N + j0 * 8 + j1] = T.Cast(dtype, p_reg[j0 * 8 + j1])
                st[3] = st[3] + T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), st[3], 1, 32, 32)
                st[1] = st[1] * alpha + st[3]
                st[0] = m_new
                for i in T.serial(DF * 8):
                    o_reg[i] = o_reg[i] * alpha
                T.tvm_storage_sync("shared")
                # O += P V, OJ 16-column fragments at a time through the staging tile
                for kf in T.serial(NF):
                    T.tvm_load_matrix_sync(Pf.data, 16, 16, 16, kf,
                                           Ps.access_ptr("r", offset=ty * 16 * PP + kf * 16),
                                           PP, "row_major", dtype="void")
                for jo in T.serial(DF // OJ):
                    for ji in T.serial(OJ):
                        T.tvm_fill_fragment(Oacc.data, 16, 16, 16, ji, T.float32(0), dtype="void")
                        for kf in T.serial(NF):
                            T.tvm_load_matrix_sync(Vf.data, 16, 16, 16, 0,
                                                   KVs.access_ptr("r", offset=(BN + kf * 16) * DP + (jo * OJ + ji) * 16),
                                                   DP, "row_major", dtype="void")
                            T.tvm_mma_sync(Oacc.data, ji, Pf.data, kf, Vf.data, 0, Oacc.data, ji, dtype="void")
                        T.tvm_store_matrix_sync(Oacc.data, 16, 16, 16, ji,
                                                Os.access_ptr("w", offset=ty * 16 * OP + ji * 16),
                                                OP, "row_major", dtype="void")
                    T.tvm_storage_sync("shared")
                    for ji in T.serial(OJ):
                        for i in T.serial(8):
                            o_reg[(jo * OJ + ji) * 8 + i] = (o_reg[(jo * OJ + ji) * 8 + i]
                                                             + Os[ty, lane_row, ji * 16 + hsel * 8 + i])
                    T.tvm_storage_sync("shared")
            if my_tok < qo_len:
                inv_l: T.let[T.float32] = T.float32(1) / st[1]
                for jf in T.serial(DF):
                    for i in T.serial(8):
                        o_h[i] = T.Cast(dtype, o_reg[jf * 8 + i] * inv_l)
                    for i in T.vectorized(8):
                        output[q_base + my_tok, by * G + my_row % G, jf * 16 + hsel * 8 + i] = o_h[i]
                if hsel == 0:
                    lse[q_base + my_tok, by * G + my_row % G] = st[0] + T.log2(st[1])

    if PAGED:
        @T.prim_func(s_tir=True)
        def attn(
            q_handle: T.handle, q_indptr_handle: T.handle, pages_handle: T.handle, page_indptr_handle: T.handle,
            page_values_handle: T.handle, length_handle: T.handle, k_rope_pos_offset_handle: T.handle,
            q_rope_position_handle: T.handle, output_handle: T.handle, lse_handle: T.handle, causal: T.int32,
            rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32,
        ):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "awq_edge.kernel": "prefill_attention"})
            B = T.int32()
            Lq = T.int32()
            nnz_pages = T.int32()
            max_pages = T.int32()
            pages_off = T.int64()
            q_indptr_off = T.int32()
            page_indptr_off = T.int32()
            values_off = T.int32()
            length_off = T.int32()
            q_rope_off = T.int32()
            k_rope_off = T.int32()
            q = T.match_buffer(q_handle, (Lq, H_qo, D), dtype)
            q_indptr = T.match_buffer(q_indptr_handle, (B + 1,), "int32", elem_offset=q_indptr_off)
            # offset_factor: a layer's pages start at a multiple of a page (vector loads need to know it)
            pages = T.match_buffer(pages_handle, (max_pages, 2, H_kv, PS, D), dtype, elem_offset=pages_off,
                                   offset_factor=PS * D)
            page_indptr = T.match_buffer(page_indptr_handle, (B + 1,), "int32", elem_offset=page_indptr_off)
            page_values = T.match_buffer(page_values_handle, (nnz_pages,), "int32", elem_offset=values_off)
            last_page_len = T.match_buffer(length_handle, (B,), "int32", elem_offset=length_off)
            q_rope_position = T.match_buffer(q_rope_position_handle, (Lq,), "int32", elem_offset=q_rope_off)  # noqa: F841
            k_rope_pos_offset = T.match_buffer(k_rope_pos_offset_handle, (B,), "int32", elem_offset=k_rope_off)  # noqa: F841
            output = T.match_buffer(output_handle, (Lq, H_qo, D), dtype)
            lse = T.match_buffer(lse_handle, (Lq, H_qo), "float32")
            # the cache asks for inline RoPE when it supports sliding windows: refuse loudly, never skip the rotation
            assert rotary_mode == 0, "prefill_attention: rotary embedding must be applied before attention (RopeMode NORMAL/NONE)"
            # every sequence adds at most one partial tile: this grid covers all tiles; spare blocks exit
            for bx in T.thread_binding(T.ceildiv(Lq * G, BM) + B, thread="blockIdx.x"):
                for by in T.thread_binding(H_kv, thread="blockIdx.y"):
                    for ty in T.thread_binding(NW, thread="threadIdx.y"):
                        for tx in T.thread_binding(32, thread="threadIdx.x"):
                            with T.sblock("attn"):
                                T.reads()
                                T.writes()
                                attend(q, q_indptr, pages, pages, page_values, page_indptr, last_page_len, output, lse, causal, sm_scale,
                                       B, Lq, bx, by, ty, tx)
    else:
        @T.prim_func(s_tir=True)
        def attn(
            q_handle: T.handle, q_indptr_handle: T.handle, k_handle: T.handle, v_handle: T.handle,
            kv_indptr_handle: T.handle, q_rope_position_handle: T.handle, k_rope_pos_offset_handle: T.handle,
            output_handle: T.handle, lse_handle: T.handle, causal: T.int32, rotary_mode: T.int32,
            rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32,
        ):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "awq_edge.kernel": "prefill_attention"})
            B = T.int32()
            Lq = T.int32()
            Lk = T.int32()
            q_indptr_off = T.int32()
            kv_indptr_off = T.int32()
            q_rope_off = T.int32()
            k_rope_off = T.int32()
            q = T.match_buffer(q_handle, (Lq, H_qo, D), dtype)
            q_indptr = T.match_buffer(q_indptr_handle, (B + 1,), "int32", elem_offset=q_indptr_off)
            k = T.match_buffer(k_handle, (Lk, H_kv, D), dtype)
            v = T.match_buffer(v_handle, (Lk, H_kv, D), dtype)
            kv_indptr = T.match_buffer(kv_indptr_handle, (B + 1,), "int32", elem_offset=kv_indptr_off)
            q_rope_position = T.match_buffer(q_rope_position_handle, (Lq,), "int32", elem_offset=q_rope_off)  # noqa: F841
            k_rope_pos_offset = T.match_buffer(k_rope_pos_offset_handle, (B,), "int32", elem_offset=k_rope_off)  # noqa: F841
            output = T.match_buffer(output_handle, (Lq, H_qo, D), dtype)
            lse = T.match_buffer(lse_handle, (Lq, H_qo), "float32")
            # the cache asks for inline RoPE when it supports sliding windows: refuse loudly, never skip the rotation
            assert rotary_mode == 0, "prefill_attention: rotary embedding must be applied before attention (RopeMode NORMAL/NONE)"
            # every sequence adds at most one partial tile: this grid covers all tiles; spare blocks exit
            for bx in T.thread_binding(T.ceildiv(Lq * G, BM) + B, thread="blockIdx.x"):
                for by in T.thread_binding(H_kv, thread="blockIdx.y"):
                    for ty in T.thread_binding(NW, thread="threadIdx.y"):
                        for tx in T.thread_binding(32, thread="threadIdx.x"):
                            with T.sblock("attn"):
                                T.reads()
                                T.writes()
                                attend(q, q_indptr, k, v, kv_indptr, kv_indptr, kv_indptr, output, lse, causal, sm_scale,
                                       B, Lq, bx, by, ty, tx)

    # the cache builds both into every module, so they need names of their own
    return attn.with_attr("global_symbol", "batch_prefill_paged_kv_tc" if PAGED else "batch_prefill_ragged_kv_tc")
