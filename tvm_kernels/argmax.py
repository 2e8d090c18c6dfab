"""Greedy token on the device: argmax over one row of logits, float32 [1, 1, V] -> int32 [1].

Why it exists: with the token chosen on the GPU, a decode step's graph can feed the next step's
embedding itself, so the host no longer has to wait for the logits before it launches the next step
(runtime/cuda_graph.py, "overlapped greedy decode"). The host then reads 4 bytes instead of V floats.

Semantics are numpy's: the lowest index among equal maxima; NaNs are skipped (numpy would return the
first NaN; logits holding NaN are broken either way), all -inf gives 0.

CUDA: one block of up to 1024 threads (the row was just written by the lm_head, so one SM reads it from
L2; SmolLM2's greedy step graph, argmax and a 4-byte copy, replays 13 us faster than the one that copies
its logits out: benchmarks/results/overlap_gap_h100.json). Thread t scans t, t + T, ... keeping (max, index),
then the block takes the maximum of the pairs packed into one 64-bit key each (TVM's cross-thread
allreduce: warp shuffles, then shared memory).
CPU (llvm): the same scan in one loop (the CPU runtime samples on the host; this is for symmetry of the
artifact's functions and for the reference test).
"""
from __future__ import annotations

import numpy as np

from tvm_kernels.errors import UserError
from tvm_kernels.targets import DeviceTarget, get_target

UNROLL = 64  # scans up to this many steps per thread are unrolled (V <= 65536 at 1024 threads): loads in flight


def reference(logits: np.ndarray) -> int:
    """numpy: index of the largest value, lowest among ties, NaNs skipped (0 when nothing is larger than -inf)."""
    x = np.asarray(logits, np.float32).reshape(-1)
    x = np.where(np.isnan(x), -np.inf, x)
    return int(np.argmax(x))


def argmax(vocab: int, target: "str | DeviceTarget"):
    """PrimFunc(logits f32[1, 1, vocab], out i32[1]) for the target."""
    if vocab <= 0 or vocab >= 2**31 - 1:
        raise UserError(f"argmax: vocabulary size must be in 1..2^31-2, got {vocab}")
    dt = get_target(target)
    f = _cuda(vocab, dt) if dt.is_cuda else _llvm(vocab)
    return f.with_attr("tirx.is_scheduled", True)


def threads(vocab: int, max_threads: int) -> int:
    """Threads of the one block: whole warps, no more than there are elements, at most max_threads."""
    return max(32, min(max_threads, 1024, -(-vocab // 32) * 32))


def _key(v, i):
    """(value, index) as one uint64 that orders like the pair: the float's bits made order-preserving as an
    unsigned word on top, the complement of the index below (lower index, larger key). One key reduces with
    a plain max; TVM's two-value allreduce updates the value before it evaluates the index's select (the
    index then compares against the new value), which breaks a pair reducer."""
    from tvm import tirx

    # -0.0 equals 0.0 for numpy's argmax but not as bits: it becomes +0.0 first (an x + 0 would be simplified away)
    u = tirx.reinterpret("uint32", tirx.Select(v == tirx.const(0, "float32"), tirx.const(0, "float32"), v))
    ordered = tirx.Select(u >= tirx.const(0x80000000, "uint32"), ~u, u | tirx.const(0x80000000, "uint32"))
    low = tirx.const(0xFFFFFFFF, "uint32") - tirx.Cast("uint32", i)
    return (tirx.Cast("uint64", ordered) << tirx.const(32, "uint64")) | tirx.Cast("uint64", low)


def _cuda(V: int, dt: DeviceTarget):
    from tvm.script import tirx as T

    TX = threads(V, dt.max_threads_per_block)
    steps = -(-V // TX)
    scan = T.unroll if steps <= UNROLL else T.serial
    NEG = T.float32("-inf")

    @T.prim_func(private=True, s_tir=True)
    def kernel(logits: T.Buffer((1, 1, V), "float32"), out: T.Buffer((1,), "int32")):
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):
            best_v = T.sblock_alloc_buffer((1,), "float32", scope="local")
            best_i = T.sblock_alloc_buffer((1,), "int32", scope="local")
            key = T.sblock_alloc_buffer((1,), "uint64", scope="local")
            red = T.sblock_alloc_buffer((1,), "uint64", scope="local")
            for bx in T.thread_binding(1, thread="blockIdx.x"):
                for tx in T.thread_binding(TX, thread="threadIdx.x"):
                    with T.sblock("scan"):
                        T.reads(logits[0, 0, 0:V])
                        T.writes(out[0])
                        best_v[0] = NEG
                        best_i[0] = 0
                        for s in scan(steps):
                            if s * TX + tx < V:
                                v: T.let[T.float32] = logits[0, 0, s * TX + tx]
                                # strictly larger (NaN never is): a thread's indices grow, so its first maximum stays
                                if v > best_v[0]:
                                    best_v[0] = v
                                    best_i[0] = s * TX + tx
                        # a thread that saw only -inf keeps index 0: then every value is -inf and 0 is right
                        key[0] = _key(best_v[0], best_i[0])
                        with T.sblock("keys"):
                            T.reads(key[0])
                            T.writes(red[0])
                            T.attr(T.comm_reducer(lambda a, b: T.max(a, b), [T.uint64(0)]), "reduce_scope", T.int32(0))
                            T.tvm_thread_allreduce(T.uint32(1), key[0], True, red[0], tx, dtype="void")
                        if tx == 0:
                            out[0] = T.Cast("int32", T.uint32(0xFFFFFFFF) - T.Cast("uint32", red[0] & T.uint64(0xFFFFFFFF)))

    return kernel


def _llvm(V: int):
    from tvm.script import tirx as T

    NEG = T.float32("-inf")

    @T.prim_func(private=True, s_tir=True)
    def kernel(logits: T.Buffer((1, 1, V), "float32"), out: T.Buffer((1,), "int32")):
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):
            best_v = T.sblock_alloc_buffer((1,), "float32")
            best_i = T.sblock_alloc_buffer((1,), "int32")
            with T.sblock("scan"):
                T.reads(logits[0, 0, 0:V])
                T.writes(out[0])
                best_v[0] = NEG
                best_i[0] = 0
                for k in T.serial(V):
                    if logits[0, 0, k] > best_v[0]:
                        best_v[0] = logits[0, 0, k]
                        best_i[0] = k
                out[0] = best_i[0]

    return kernel
