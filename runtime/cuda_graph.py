"""The whole batch-1 decode step as one CUDA graph: `embed` + `decode` captured, then replayed with one launch.

Why: SmolLM2's decode step is ~250 kernels of 1-5 us. The Relax VM and the paged KV cache enqueue them
one by one from the host, which took as long as the kernels ran (benchmarks/results/host_overhead_h200.json),
and TVM's own CUDA graphs (relax.backend.use_cuda_graph) cover only the stretches between KV-cache calls.
A replay leaves the host the KV cache's bookkeeping and one launch: the token id comes in and the logits
go out through pinned host buffers, copied by the graph itself.

What a replay relies on, and how it is arranged:
- The same buffers. The token id goes into a fixed device buffer (from a pinned host word the graph
  copies) and the logits tensor of the capture is kept (the graph copies it to pinned host memory).
  The VM's intermediates come from TVM's pooled allocator, shared by the process's engines, which
  counts them free after the capture: a replay may write blocks that a prefill or another engine
  uses meanwhile. That is safe because every block a replay writes is produced and consumed inside
  the replay (what lives across steps — weights, KV pages, the token buffer — is not from the pool)
  and no two steps overlap in time: each ends with a stream synchronize. Engines must therefore not
  run from two threads at once.
- The same kernel arguments. The KV cache keeps its per-step page table and positions in one merged
  device buffer; each array starts at a 16-byte boundary (attn_utils.h, cuda_byte_alignment_), and at
  batch 1 only two of them change size: the sequence's page list and, with sliding-window layers, the
  window's page list. The offsets the kernels take as arguments therefore change only when one of
  them grows past a multiple of AUX_ALIGN_PAGES int32 entries (`graph_key`). Each key gets its graph,
  captured on first use (0.8 ms) and kept among the last MAX_GRAPHS; a growing sequence needs a new
  one every 4 x page_size = 64 steps, a window's page count toggles between two keys that both stay.
  Graphs of several keys may share intermediate blocks: never two at once, so that is fine too.
  Every step's logits equal plain VM calls' bit for bit across such changes (`benchmarks/e2e.py
  device-graph`, in benchmarks/results/cuda_graph_*_h100.json), which would break if another argument moved.
- No host-to-device copy inside the graph. The cache copies its page table lazily, in the first call of
  a step that needs it; `get_query_positions` before the launch makes that copy happen outside, on the
  cache's copy stream, which the cache orders before its compute stream.
- One stream. The cache takes the current stream at creation as its compute stream, so the engine makes
  its own (blocking) stream current while it creates the cache and while it runs any function; TVM's
  CopyFromBytes / CopyToBytes on the legacy stream order against a blocking stream.
- No CUDA graph inside: an artifact built with TVM's regional graphs launches them from inside the step,
  which a capture refuses (CUDA error 900). The exporter says which artifacts qualify: manifest
  `cuda_graph.mode == "decode-step"`.

Overlapped decode (`launch_token` / `wait` / `read_token`; artifacts with the `argmax` function, and for
sampled decoding or a repetition penalty the `sample` function, tvm_kernels/sample.py): the step's
graph also picks the next token on the GPU and writes it into the token buffer the next step embeds,
so the host no longer needs step i's token before it queues step i+1: reading it, the stop checks, the
consumer's work and the KV cache's begin_forward for step i+1 all happen while step i runs. What the host
cannot move ahead is the page-table copy: the cache issues it on its own copy stream (non-blocking, nothing
orders it after step i, whose kernels read the same device buffer), so the engine waits for step i to finish
(`wait`) before it makes the cache copy step i+1's table, then launches at once. The GPU's idle time between
steps shrinks to that copy, the launch and the token's copy out (benchmarks/results/overlap_gap_h100.json;
waiting only for the step's last attention kernel instead measured no faster: attention_mark_ab_h100.json).
The tokens come back through two pinned words used in turn.
A generation that ends (EOS, a stop string, an exception) with a step gone ahead on its last token rolls
that step back from the cache (runtime/engine.py); greedy tokens are those of host greedy sampling, since the
kernel is numpy's argmax (lowest id among ties): e2e.py device-graph checks both, and the cache left behind.
Sampled tokens follow the host sampler's rules but not its draws (the kernel's noise is a hash of seed,
step and token id; sample's parameters, seed and the ids seen so far live in device buffers the graph
reads, the last two also written: the step counter, each token marked seen).
"""
from __future__ import annotations

import ctypes
import time
from collections import OrderedDict
from typing import Any

import numpy as np

from runtime import tvm_loader
from runtime.errors import UserError

MODE = "decode-step"
CAPTURE_RELAXED = 2  # cudaStreamCaptureModeRelaxed: a first-time pool allocation (cudaMalloc) may happen inside
H2D, D2H, D2D = 1, 2, 3  # cudaMemcpyKind
EVENT_DISABLE_TIMING = 2
MAX_GRAPHS = 4  # instantiated graphs kept per engine (the oldest is updated in place for a new key)
# page-list entries (int32) per 16-byte alignment unit of the KV cache's merged aux buffer, as TVM 0.27 lays
# it out (src/runtime/vm/attn_utils.h); the libraries of another TVM version get a re-capture at every page
AUX_ALIGN_PAGES = 4
AUX_LAYOUT_VERSIONS = ("0.27",)
MODES = ("logits", "argmax", "sample")  # what a step graph ends with; the last two leave the next token on the GPU
TOKEN_MODES = MODES[1:]


def pages_per_key(tvm_version: str) -> int:
    """How many KV-cache pages one graph serves, for the TVM version the artifact was built with (its runtime
    libraries are the same version: the model library links against them)."""
    return AUX_ALIGN_PAGES if tvm_version.startswith(AUX_LAYOUT_VERSIONS) else 1


def use_step_graph(manifest, device: str, requested: bool | None, where: str) -> bool:
    """Whether an engine replays decode steps from a graph. requested None = wherever the artifact allows it."""
    graph = manifest.cuda_graph or {}
    allowed = device == "cuda" and graph.get("mode") == MODE
    if requested and not allowed:
        why = "it runs on the CPU" if device != "cuda" else graph.get("why", "its manifest has no cuda_graph.mode")
        raise UserError(f"{where}: cannot replay decode steps from a CUDA graph: {why} "
                        f"(re-export with --cuda-graph step, or run with --cuda-graph off)")
    return allowed if requested is None else bool(requested)


def pages_spanned(tokens: int, page_size: int) -> int:
    """KV-cache pages a sequence of `tokens` occupies."""
    return -(-tokens // page_size)


def window_pages(tokens: int, page_size: int, window: int) -> int:
    """Pages a sliding-window layer attends over, as TVM 0.27's cache counts them
    (GetLayerSlidingWindowNumPages: the window starts (tokens - window) % page_size into its first page)."""
    if tokens == 0:
        return 0
    offset = 0 if tokens <= window else (tokens - window) % page_size
    return min(pages_spanned(tokens, page_size), -(-(offset + min(tokens, window)) // page_size))


def graph_key(tokens: int, page_size: int, pages_per_key: int = AUX_ALIGN_PAGES, window: int = 0) -> tuple[int, ...]:
    """The aux-buffer layout a step of a `tokens`-long sequence sees: one graph serves each value."""
    key = (-(-pages_spanned(tokens, page_size) // pages_per_key),)
    if window:
        key += (-(-window_pages(tokens, page_size, window) // pages_per_key),)
    return key


class Cuda:
    """The few CUDA runtime calls a step graph needs, through the libcudart.so.13 that TVM links."""

    def __init__(self):
        lib = tvm_loader.cudart()
        vp, pvp = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)
        sig = {
            "cudaStreamCreate": [pvp],
            "cudaHostAlloc": [pvp, ctypes.c_size_t, ctypes.c_uint],
            "cudaFreeHost": [vp],
            "cudaMemcpyAsync": [vp, vp, ctypes.c_size_t, ctypes.c_int, vp],
            "cudaStreamSynchronize": [vp],
            "cudaStreamBeginCapture": [vp, ctypes.c_int],
            "cudaStreamEndCapture": [vp, pvp],
            "cudaGraphInstantiate": [pvp, vp, ctypes.c_ulonglong],
            "cudaGraphExecUpdate": [vp, vp, vp],
            "cudaGraphLaunch": [vp, vp],
            "cudaGraphDestroy": [vp],
            "cudaGraphExecDestroy": [vp],
            "cudaGetLastError": [],
            "cudaEventCreateWithFlags": [pvp, ctypes.c_uint],
            "cudaEventRecord": [vp, vp],
            "cudaEventSynchronize": [vp],
            "cudaEventDestroy": [vp],
        }
        for name, args in sig.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
        lib.cudaGetErrorString.argtypes, lib.cudaGetErrorString.restype = [ctypes.c_int], ctypes.c_char_p
        self.lib = lib

    def __call__(self, name: str, *args) -> None:
        err = getattr(self.lib, name)(*args)
        if err:
            raise UserError(f"CUDA graph: {name} failed: {self.lib.cudaGetErrorString(err).decode()} (error {err}); "
                            f"run with --cuda-graph off")

    def stream(self) -> int:
        s = ctypes.c_void_p()
        self("cudaStreamCreate", ctypes.byref(s))
        return int(s.value)

    def event(self) -> int:
        e = ctypes.c_void_p()
        self("cudaEventCreateWithFlags", ctypes.byref(e), EVENT_DISABLE_TIMING)
        return int(e.value)

    def pinned(self, n: int, dtype: str) -> tuple[np.ndarray, int]:
        """A page-locked host array (a graph may copy to and from it) and its address."""
        ptr = ctypes.c_void_p()
        nbytes = n * np.dtype(dtype).itemsize
        self("cudaHostAlloc", ctypes.byref(ptr), nbytes, 0)
        return np.frombuffer((ctypes.c_char * nbytes).from_address(ptr.value), dtype=dtype), int(ptr.value)


class StepGraph:
    """Instantiated graphs of `token -> embed -> decode -> logits`, one per aux-buffer layout (graph_key)."""

    def __init__(self, cuda: Cuda, stream: int, page_size: int, run_step, token_ptr: int, vocab: int,
                 tvm_version: str = "", window: int = 0):
        """run_step(mode) -> (logits tensor, *tensors to keep alive), or for a mode in TOKEN_MODES (int32 [1]
        token, *tensors to keep alive): the VM calls of one step on the token at device address token_ptr, on
        the current stream; mode "logits", or "argmax" / "sample" (the function that picks the next token on
        the device). window: the sliding-window layers' window (0: none)."""
        self.cuda, self.stream, self.page_size, self.run_step = cuda, stream, page_size, run_step
        self.token_ptr, self.window = token_ptr, window
        self.token_in, self._token_in_ptr = cuda.pinned(1, "int32")
        self.logits_out, self._logits_out_ptr = cuda.pinned(vocab, "float32")
        self.tokens_out, self._tokens_out_ptr = cuda.pinned(2, "int32")
        self.done = [cuda.event(), cuda.event()]
        self._slot = 0
        self.pages_per_key = pages_per_key(tvm_version)
        # (mode index, *graph_key) -> (instantiated graph, tensors it uses)
        self.graphs: OrderedDict[tuple[int, ...], tuple[ctypes.c_void_p, tuple[Any, ...]]] = OrderedDict()
        self.warm: set[str] = set()  # modes whose first step has run plainly
        self._pending: tuple[Any, ...] = ()  # a plain step's tensors, kept until the next step is queued
        self.counts = {"captures": 0, "instantiations": 0, "replays": 0, "capture_ms": 0.0}

    def step(self, token: int, tokens_after: int) -> np.ndarray:
        """One decode step whose sequence holds `tokens_after` tokens once it is done -> the logits (a view
        of pinned memory, valid until the next step). The caller has begun the KV cache's forward and
        made the page table current on the device (get_query_positions), with self.stream current."""
        self.token_in[0] = token
        self._run("logits", tokens_after)
        self.cuda("cudaStreamSynchronize", self.stream)
        return self.logits_out

    def launch_token(self, tokens_after: int, token: int | None = None, mode: str = "argmax") -> int:
        """Queue one step that picks its token on the device (mode "argmax" or "sample") without waiting for
        it; `token`: its input, or None for the token the previous such step left in the token buffer. Returns
        the slot that wait / read_token take. Called like step, once the step queued before it is done (`wait`)."""
        if mode not in TOKEN_MODES:
            raise ValueError(f"mode {mode!r}: expected one of {TOKEN_MODES}")
        slot, self._slot = self._slot, self._slot ^ 1
        if token is not None:
            self.token_in[0] = token  # the previous generation's steps have all finished: nothing reads it now
            self.cuda("cudaMemcpyAsync", self.token_ptr, self._token_in_ptr, 4, H2D, self.stream)
        self._run(mode, tokens_after)
        self.cuda("cudaMemcpyAsync", self._tokens_out_ptr + 4 * slot, self.token_ptr, 4, D2H, self.stream)
        self.cuda("cudaEventRecord", self.done[slot], self.stream)
        return slot

    def wait(self, slot: int) -> None:
        """Until the step in `slot` and the copy of its token are done."""
        self.cuda("cudaEventSynchronize", self.done[slot])

    def read_token(self, slot: int) -> int:
        self.wait(slot)
        return int(self.tokens_out[slot])

    def _run(self, mode: str, tokens_after: int) -> None:
        if mode not in self.warm:  # a mode's first step runs plainly: kernels load and the allocator fills
            self.warm.add(mode)  # outside a capture
            self._pending = self._enqueue(mode)
            return
        self._pending = ()
        key = (MODES.index(mode),) + graph_key(tokens_after, self.page_size, self.pages_per_key, self.window)
        if key in self.graphs:
            self.graphs.move_to_end(key)
        else:
            self._capture(key, mode)
        self.cuda("cudaGraphLaunch", self.graphs[key][0], self.stream)
        self.counts["replays"] += 1

    def _enqueue(self, mode: str) -> tuple[Any, ...]:
        """The step's work on the stream: (token in,) the VM calls, then logits out or the device's token into
        the token buffer for the next step."""
        if mode == "logits":
            self.cuda("cudaMemcpyAsync", self.token_ptr, self._token_in_ptr, 4, H2D, self.stream)
        kept = self.run_step(mode)
        out = kept[0]
        if mode in TOKEN_MODES:
            if str(out.dtype) != "int32" or int(np.prod(out.shape)) != 1:
                raise UserError(f"{mode} returned {out.dtype} {tuple(out.shape)}, expected one int32")
            self.cuda("cudaMemcpyAsync", self.token_ptr, out.data_ptr(), 4, D2D, self.stream)
            return kept
        if str(out.dtype) != "float32" or int(np.prod(out.shape)) != self.logits_out.size:
            raise UserError(f"decode returned {out.dtype} {tuple(out.shape)}, expected float32 logits "
                            f"of {self.logits_out.size}")
        self.cuda("cudaMemcpyAsync", self._logits_out_ptr, out.data_ptr(), self.logits_out.nbytes, D2H, self.stream)
        return kept

    def _capture(self, key: tuple[int, ...], mode: str) -> None:
        t = time.perf_counter()
        graph = ctypes.c_void_p()
        self.cuda("cudaStreamBeginCapture", self.stream, CAPTURE_RELAXED)
        try:
            kept = self._enqueue(mode)
        except BaseException:  # KeyboardInterrupt included: a capture left open would break the stream
            self.cuda.lib.cudaStreamEndCapture(self.stream, ctypes.byref(graph))
            self.cuda.lib.cudaGetLastError()
            if graph.value:
                self.cuda.lib.cudaGraphDestroy(graph)
            raise
        self.cuda("cudaStreamEndCapture", self.stream, ctypes.byref(graph))
        try:
            self.counts["captures"] += 1
            exec_ = ctypes.c_void_p()
            if len(self.graphs) >= MAX_GRAPHS:  # reuse the oldest: an update costs less than an instantiation
                _, (exec_, _) = self.graphs.popitem(last=False)
                info = ctypes.create_string_buffer(64)  # cudaGraphExecUpdateResultInfo
                if self.cuda.lib.cudaGraphExecUpdate(exec_, graph, info) != 0:
                    self.cuda.lib.cudaGetLastError()  # a changed topology: instantiate anew
                    self.cuda("cudaGraphExecDestroy", exec_)
                    exec_ = ctypes.c_void_p()
            if not exec_.value:
                self.cuda("cudaGraphInstantiate", ctypes.byref(exec_), graph, 0)
                self.counts["instantiations"] += 1
        finally:
            self.cuda.lib.cudaGraphDestroy(graph)
        self.graphs[key] = (exec_, kept)
        self.counts["capture_ms"] += (time.perf_counter() - t) * 1e3

    def close(self) -> None:
        """Release the graphs and the pinned buffers (the arrays handed out before become invalid)."""
        while self.graphs:
            _, (exec_, _) = self.graphs.popitem()
            self.cuda.lib.cudaGraphExecDestroy(exec_)
        for attr in ("_token_in_ptr", "_logits_out_ptr", "_tokens_out_ptr"):
            if getattr(self, attr, 0):
                self.cuda.lib.cudaFreeHost(ctypes.c_void_p(getattr(self, attr)))
                setattr(self, attr, 0)
        for event in getattr(self, "done", []):
            self.cuda.lib.cudaEventDestroy(ctypes.c_void_p(event))
        self.done = []

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001  (interpreter shutdown: the library may be gone)
            pass
