"""The whole batch-1 decode step as one CUDA graph: `embed` + `decode` captured, then replayed with one launch.

Why: SmolLM2's decode step is ~250 kernels of 1-5 us. The Relax VM and the paged KV cache enqueue them
one by one from the host, which took as long as the kernels ran (benchmarks/results/host_overhead_h200.json),
and TVM's own CUDA graphs (relax.backend.use_cuda_graph) cover only the stretches between KV-cache calls.
A replay leaves the host the KV cache's bookkeeping, one 4-byte copy and one launch.

What a replay relies on, and how it is arranged:
- The same buffers. The token id goes into a fixed device buffer and the logits tensor of the capture is
  kept. The VM's intermediates come from its pooled allocator and are free between two steps: nothing
  else allocates on the device between two decode steps but a prefill, whose buffers die before the
  next step runs.
- The same kernel arguments. The KV cache keeps its per-step page table and positions in one merged
  device buffer, at offsets that depend only on how many pages the sequence spans (batch 1, no
  sliding window), so a graph is valid for one page count and is re-captured (cudaGraphExecUpdate)
  when a step enters a new page: once every page_size steps.
- No host-to-device copy inside the graph. The cache copies its page table lazily, in the first call of
  a step that needs it; `get_query_positions` before the launch makes that copy happen outside, on the
  cache's copy stream, which the cache orders before its compute stream.
- One stream. The cache takes the current stream at creation as its compute stream, so the engine makes
  its own (blocking) stream current while it creates the cache and while it runs any function; TVM's
  CopyFromBytes / CopyToBytes on the legacy stream order against a blocking stream.
- No CUDA graph inside: an artifact built with TVM's regional graphs launches them from inside the step,
  which a capture refuses (CUDA error 900). The exporter says which artifacts qualify: manifest
  `cuda_graph.mode == "decode-step"`.
"""
from __future__ import annotations

import ctypes
from typing import Any

from runtime import tvm_loader
from runtime.errors import UserError

MODE = "decode-step"
CAPTURE_RELAXED = 2  # cudaStreamCaptureModeRelaxed: a first-time pool allocation (cudaMalloc) may happen inside


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
    """KV-cache pages a sequence of `tokens` occupies: the key a step graph is valid for."""
    return -(-tokens // page_size)


class Cuda:
    """The few CUDA runtime calls a step graph needs, through the libcudart.so.13 that TVM links."""

    def __init__(self):
        lib = tvm_loader.cudart()
        vp, pvp = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)
        sig = {
            "cudaStreamCreate": [pvp],
            "cudaStreamSynchronize": [vp],
            "cudaStreamBeginCapture": [vp, ctypes.c_int],
            "cudaStreamEndCapture": [vp, pvp],
            "cudaGraphInstantiate": [pvp, vp, ctypes.c_ulonglong],
            "cudaGraphExecUpdate": [vp, vp, vp],
            "cudaGraphLaunch": [vp, vp],
            "cudaGraphDestroy": [vp],
            "cudaGraphExecDestroy": [vp],
            "cudaGetLastError": [],
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


class StepGraph:
    """One instantiated graph of `embed(token) -> decode(x, kv)`, re-captured when the page count changes."""

    def __init__(self, cuda: Cuda, stream: int, page_size: int, run_step):
        """run_step() -> (logits, *tensors to keep): the VM calls of one step, on the current stream."""
        self.cuda, self.stream, self.page_size, self.run_step = cuda, stream, page_size, run_step
        self.exec = ctypes.c_void_p()
        self.key: int | None = None
        self.kept: tuple[Any, ...] = ()
        self.warm = False
        self.counts = {"captures": 0, "instantiations": 0, "replays": 0}

    def step(self, tokens_after: int):
        """Run one decode step whose sequence holds `tokens_after` tokens once it is done; returns the logits
        tensor (valid until the next step). The caller has begun the KV cache's forward and made the
        page table current on the device (get_query_positions)."""
        if not self.warm:  # the first step runs plainly: kernels load and the allocator fills outside capture
            self.warm = True
            return self.run_step()[0]
        key = pages_spanned(tokens_after, self.page_size)
        if key != self.key:
            self._capture(key)
        self.cuda("cudaGraphLaunch", self.exec, self.stream)
        self.counts["replays"] += 1
        return self.kept[0]

    def _capture(self, key: int) -> None:
        graph = ctypes.c_void_p()
        self.kept = ()
        self.cuda("cudaStreamBeginCapture", self.stream, CAPTURE_RELAXED)
        try:
            kept = self.run_step()
        except Exception:
            self.cuda.lib.cudaStreamEndCapture(self.stream, ctypes.byref(graph))
            self.cuda.lib.cudaGetLastError()
            if graph.value:
                self.cuda.lib.cudaGraphDestroy(graph)
            raise
        self.cuda("cudaStreamEndCapture", self.stream, ctypes.byref(graph))
        try:
            self.counts["captures"] += 1
            info = ctypes.create_string_buffer(64)  # cudaGraphExecUpdateResultInfo
            if self.exec.value and self.cuda.lib.cudaGraphExecUpdate(self.exec, graph, info) != 0:
                self.cuda.lib.cudaGetLastError()  # a changed topology: instantiate anew
                self.cuda("cudaGraphExecDestroy", self.exec)
                self.exec = ctypes.c_void_p()
            if not self.exec.value:
                self.cuda("cudaGraphInstantiate", ctypes.byref(self.exec), graph, 0)
                self.counts["instantiations"] += 1
        finally:
            self.cuda.lib.cudaGraphDestroy(graph)
        self.kept, self.key = kept, key

    def close(self) -> None:
        if self.exec.value:
            self.cuda.lib.cudaGraphExecDestroy(self.exec)
            self.exec = ctypes.c_void_p()
