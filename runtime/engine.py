"""Engine: load an artifact and generate tokens with the Relax VM and TVM's paged KV cache.

    eng = Engine("artifacts/smollm2-awq-cpu")
    print(eng.generate("What is the capital of France?", chat=True, max_new_tokens=32).text)
    for piece in eng.stream("Once upon a time", max_new_tokens=64):
        print(piece, end="", flush=True)

One sequence (batch 1) lives in the KV cache. The engine remembers which token ids the cache holds;
a new prompt that starts with them (the next turn of a chat, or the same prompt again) only prefills
what is new, and one that diverges pops the cache back to the common prefix first.
"""
from __future__ import annotations

import contextlib
import ctypes
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from runtime import tvm_loader
from runtime.cuda_graph import Cuda, StepGraph, use_step_graph
from runtime.errors import UserError
from runtime.manifest import Manifest
from runtime.sampling import Sampler, SamplingParams
from runtime.tokenizer import StopStrings, Tokenizer
from runtime.weights import NP_DTYPES, ParamReader

REQUIRED_FUNCTIONS = ("create_kv_cache", "embed", "prefill", "decode")
SEQ_ID = 0


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # generated ids (the stop token included when EOS ended it)
    prompt_tokens: int  # tokens of the prompt
    prefilled_tokens: int  # of those, how many were run (the rest were already in the KV cache)
    finish_reason: str  # "eos" | "stop" | "length" | "context"
    ttft_s: float  # prompt in -> first token sampled
    decode_s: float  # the decode steps after the first token
    timings: dict[str, Any] = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        n = max(len(self.token_ids) - 1, 0)
        return n / self.decode_s if self.decode_s > 0 else float("nan")


class Engine:
    def __init__(self, artifact: str | Path, device: str = "auto", verify: bool = True,
                 synthesize_weights: bool = False, seed: int = 0, cuda_graph: bool | None = None,
                 overlap: bool = True):
        """Load `artifact` onto `device` ("auto" = the artifact's target device, "cpu" or "cuda").

        verify: check every file's sha256 against the manifest first.
        synthesize_weights: for an artifact exported without weights (speed benchmarks), fill every
        parameter with random values of its manifest shape and dtype instead of reading params.
        cuda_graph: replay each decode step from one CUDA graph (runtime/cuda_graph.py); None = where the
        artifact allows it (manifest cuda_graph.mode "decode-step"), True = required, False = never.
        overlap: with a step graph and an artifact that has `argmax`, greedy decoding picks tokens on the GPU
        and queues each step before the previous one is read (runtime/cuda_graph.py), and so does any other
        decoding (sampled, or with a repetition penalty) where the artifact has `sample`; False synchronizes
        every step and samples on the host, as the CPU runtime does.
        """
        self.folder = Path(artifact)
        self.manifest = Manifest.load(self.folder, verify=verify)
        m = self.manifest
        built_for = m.target.get("device", "cpu")
        self.device_name = built_for if device == "auto" else device
        if self.device_name not in tvm_loader.DEVICE_TYPES:
            raise UserError(f"--device must be auto, cpu or cuda, got {device!r}")
        if self.device_name != built_for:
            raise UserError(f"{self.folder}: built for {m.target.get('name')} ({built_for}), cannot run on {self.device_name}")
        missing = [f for f in REQUIRED_FUNCTIONS if f not in m.functions]
        if missing:
            raise UserError(f"{self.folder / 'manifest.json'}: lists no function {', '.join(missing)}")

        self.ffi = tvm_loader.load_runtime(self.device_name)
        self._alloc = self.ffi.get_global_func("runtime.TVMTensorAllocWithScope")
        self._from_bytes = self.ffi.get_global_func("runtime.TVMTensorCopyFromBytes")
        self._to_bytes = self.ffi.get_global_func("runtime.TVMTensorCopyToBytes")
        self._view = self.ffi.get_global_func("runtime.TVMTensorCreateView")
        self._sync = self.ffi.get_global_func("runtime.Device_StreamSync")
        self._kv_add = self.ffi.get_global_func("vm.builtin.kv_state_add_sequence")
        self._kv_remove = self.ffi.get_global_func("vm.builtin.kv_state_remove_sequence")
        self._kv_popn = self.ffi.get_global_func("vm.builtin.kv_state_popn")
        self._kv_begin = self.ffi.get_global_func("vm.builtin.kv_state_begin_forward")
        self._kv_end = self.ffi.get_global_func("vm.builtin.kv_state_end_forward")
        self.device = self.ffi.device(self.device_name, 0)
        self.cpu = self.ffi.device("cpu", 0)
        self._qpos = self.ffi.get_global_func("vm.builtin.attention_kv_cache_get_query_positions")
        graph = use_step_graph(m, self.device_name, cuda_graph, str(self.folder / "manifest.json"))
        self._cuda = Cuda() if graph else None
        self.cuda_stream = self._cuda.stream() if graph else None  # the engine's own stream (see runtime/cuda_graph.py)

        self.memory_before_load = tvm_loader.cuda_memory_used() if self.device_name == "cuda" else None
        lib_path = self.folder / m.library
        if not lib_path.is_file():
            raise UserError(f"{lib_path}: missing (manifest `library`)")
        self.lib = tvm_loader.load_module(lib_path, self.device_name)
        try:
            self.vm = self.lib["vm_load_executable"]()
            dev_type = tvm_loader.DEVICE_TYPES[self.device_name]
            # device, then the host (CPU); allocator 2 = pooled, so steady-state steps reuse buffers
            self.vm["vm_initialization"](dev_type, 0, 2, tvm_loader.DEVICE_TYPES["cpu"], 0, 2)
            self.fn = {name: self.vm[name] for name in m.functions
                       if name in REQUIRED_FUNCTIONS + ("prefill_logits", "argmax", "sample")}
        except Exception as e:
            raise UserError(f"{lib_path}: not a Relax VM library with the artifact's functions ({e})") from None

        self.hidden = int(m.model["hidden_size"])
        self.vocab = int(m.model["vocab_size"])
        kv = m.kv_cache
        self.context_length = int(kv["max_total_seq_len"])
        self.prefill_chunk = int(kv.get("prefill_chunk_size", self.context_length))
        self.params = self._load_params(synthesize_weights, seed)
        page_size = int(kv.get("page_size", 16))
        with self._on_stream():  # the cache keeps the current stream as its compute stream
            self.kv = self.fn["create_kv_cache"](
                self.ffi.Shape([int(kv.get("max_batch_size", 1))]), self.ffi.Shape([self.context_length]),
                self.ffi.Shape([self.prefill_chunk]), self.ffi.Shape([page_size]),
                self.ffi.Shape([int(bool(kv.get("sliding_window", 0)))]))
        self._kv_add(self.kv, SEQ_ID)
        self.graph = None
        self.cached: list[int] = []  # token ids whose keys/values the cache holds
        self._token_buf = self.empty((1,), "int32")
        if graph:
            self.graph = StepGraph(self._cuda, self.cuda_stream, page_size, self._decode_calls,
                                   self._token_buf.data_ptr(), self.vocab, m.tvm_version,
                                   window=int(kv.get("layer_sliding_window", 0) or 0))
        self.overlap = bool(overlap) and self.graph is not None and "argmax" in self.fn
        # sampled decoding on the device: [temperature, top_p, top_k, penalty], [seed, counter] and the ids
        # seen so far, read (the last two also written) by the graph
        self.overlap_sampling = self.overlap and "sample" in self.fn
        if self.overlap_sampling:
            self._sample_cfg, self._sample_rng = self.empty((4,), "float32"), self.empty((2,), "int32")
            self._sample_seen = self.empty((self.vocab,), "int32")
        self._logits_host = np.empty((self.vocab,), dtype=np.float32)
        self._tokenizer: Tokenizer | None = None

    # -- tensors -----------------------------------------------------------------------------------
    def empty(self, shape: Sequence[int], dtype: str, device=None):
        return self._alloc(self.ffi.Shape([int(d) for d in shape]), self.ffi.dtype(dtype), device or self.device, None)

    def to_device(self, array: np.ndarray, out=None):
        array = np.ascontiguousarray(array)
        t = out if out is not None else self.empty(array.shape, str(array.dtype))
        self._from_bytes(t, array.ctypes.data_as(ctypes.c_void_p), array.nbytes)
        return t

    def to_host(self, tensor, out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            out = np.empty(tuple(tensor.shape), dtype=NP_DTYPES[str(tensor.dtype)])
        self._to_bytes(tensor, out.ctypes.data_as(ctypes.c_void_p), out.nbytes)
        return out

    def sync(self):
        if self.cuda_stream is not None:
            self._cuda("cudaStreamSynchronize", self.cuda_stream)
        self._sync(self.device, 0)

    def _on_stream(self):
        """Make the engine's stream current for TVM (a no-op without one): several engines may share a process."""
        if self.cuda_stream is None:
            return contextlib.nullcontext()
        return self.ffi.use_raw_stream(self.device, self.cuda_stream)

    def _load_params(self, synthesize: bool, seed: int):
        m = self.manifest
        reader = ParamReader(self.folder)  # one file or shards, as each manifest entry says
        arrays = []
        rng = np.random.default_rng(seed)
        pool = None
        for p in m.params:
            name, shape, dtype = p["name"], tuple(int(d) for d in p["shape"]), p["dtype"]
            if synthesize:
                if pool is None:  # one random pool, sliced per tensor: fast for 7B-size models
                    pool = {"float16": (rng.standard_normal(1 << 22) * 0.02).astype(np.float16),
                            "uint32": rng.integers(0, 2**32, 1 << 22, dtype=np.uint32),
                            "int8": rng.integers(-127, 128, 1 << 22, dtype=np.int8)}
                arrays.append(self._synth(pool, name, shape, dtype, rng))
                continue
            arrays.append(self.to_device(reader.get(p)))
        return self.ffi.convert(arrays)

    def _synth(self, pool, name, shape, dtype, rng):
        n = int(np.prod(shape))
        if dtype == "float16" and ("norm" in name or name.endswith("zeros")):
            base = np.full(n, 8.0 if name.endswith("zeros") else 1.0, dtype=np.float16)
        elif dtype == "float16" and name.endswith("scales"):
            base = np.full(n, 0.002, dtype=np.float16)
        elif dtype in pool:
            start = int(rng.integers(0, pool[dtype].size))
            base = np.resize(np.roll(pool[dtype], -start), n)
        else:
            base = np.zeros(n, dtype=NP_DTYPES[dtype])
        return self.to_device(base.reshape(shape))

    # -- tokenizer ---------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_artifact(self.folder, self.manifest.tokenizer)
        return self._tokenizer

    @property
    def eos_token_ids(self) -> set[int]:
        ids = self.manifest.tokenizer.get("eos_token_ids") or []
        ids = {int(i) for i in ([ids] if isinstance(ids, int) else ids)}
        return ids or (self.tokenizer.eos_token_ids if self._has_tokenizer() else set())

    def _has_tokenizer(self) -> bool:
        return (self.folder / "tokenizer.json").is_file()

    # -- the forward passes ------------------------------------------------------------------------
    def reset(self):
        """Forget the sequence: the next prompt is prefilled from its first token."""
        self._kv_remove(self.kv, SEQ_ID)
        self._kv_add(self.kv, SEQ_ID)
        self.cached = []

    def _embed(self, ids: np.ndarray, out=None):
        return self._embed_tensor(self.to_device(ids.astype(np.int32), out), len(ids))

    def _embed_tensor(self, t, n: int):
        e = self.fn["embed"](t, self.params)
        return self._view(e, self.ffi.Shape([1, n, self.hidden]), e.dtype, 0)

    @contextlib.contextmanager
    def _forward_of(self, ids: Sequence[int]):
        """Around one forward of `ids`: the engine's stream, the KV cache's begin and end, then `cached` grows.
        A failure forgets the sequence: the cache has room reserved for tokens whose keys were never written,
        so `cached` could no longer be trusted (the next prompt is prefilled from its start)."""
        with self._on_stream():
            self._kv_begin(self.kv, self.ffi.Shape([SEQ_ID]), self.ffi.Shape([len(ids)]))
            try:
                yield
            except BaseException:
                try:
                    self._kv_end(self.kv)
                finally:
                    self.reset()
                raise
            self._kv_end(self.kv)
        self.cached.extend(int(i) for i in ids)

    def _forward(self, fn: str, ids: np.ndarray):
        with self._forward_of(ids):
            out = self.fn[fn](self._embed(ids, self._token_buf if len(ids) == 1 else None), self.kv, self.params)
        return out

    def _decode_calls(self, mode: str = "logits"):
        """One decode step's VM calls on the token in _token_buf: what a step graph captures; mode "argmax" /
        "sample" puts the token the device picks (int32 [1]) first."""
        x = self._embed_tensor(self._token_buf, 1)
        logits = self.fn["decode"](x, self.kv, self.params)
        if mode == "argmax":
            return self.fn["argmax"](logits), logits, x
        if mode == "sample":
            return self.fn["sample"](logits, self._sample_cfg, self._sample_rng, self._sample_seen), logits, x
        return logits, x

    def _set_sampling(self, p: SamplingParams, history: Sequence[int]) -> None:
        """The device's sampling state for the next generation (no step is in flight: each generation ends
        synchronized): parameters, seed (its draws repeat; without one, a fresh seed from the host's entropy)
        and the ids seen so far (the repetition penalty's history: the prompt and the tokens drawn)."""
        seed = p.seed if p.seed is not None else int(np.random.default_rng().integers(2**31))
        self.to_device(np.array([p.temperature, p.top_p, p.top_k, p.repetition_penalty], np.float32),
                       out=self._sample_cfg)
        self.to_device(np.array([seed & 0x7FFFFFFF, 0], np.int32), out=self._sample_rng)
        seen = np.zeros(self.vocab, np.int32)
        seen[np.asarray(history, dtype=np.int64)] = 1
        self.to_device(seen, out=self._sample_seen)

    def _graph_step(self, token: int) -> np.ndarray:
        with self._forward_of([token]):
            self._qpos(self.kv)  # the page table goes to the device now, outside the graph
            logits = self.graph.step(int(token), len(self.cached) + 1).copy()
        return logits

    def _launch(self, token: int | None, after: int | None = None, mode: str = "argmax") -> int:
        """Queue a step on `token` that picks the next one on the device (None: the one the step in slot
        `after` leaves there, which `cached` holds as -1 until it is read). Returns the step's slot
        (StepGraph.read_token)."""
        self._check_room(1)
        with self._forward_of([-1 if token is None else token]):
            if after is not None:  # the cache's page-table copy must not overwrite the table that step still reads
                self.graph.wait(after)
            self._qpos(self.kv)
            return self.graph.launch_token(len(self.cached) + 1, token, mode)

    def _decode_overlapped(self, token: int, n: int, stop_token_ids: set[int], stats: dict, t1: float,
                           mode: str = "argmax") -> Iterator[int]:
        """Up to n tokens after `token` picked on the device (mode "argmax" or "sample"), each step queued
        before the previous one's token is read (runtime/cuda_graph.py). The cache ends as the synchronized
        path leaves it: a step that went ahead on the token that ended generation is popped again."""
        queued = [self._launch(token, mode=mode)]  # slots of steps whose token is not read yet
        produced = 0
        try:
            while queued:
                if produced + 1 < n and len(self.cached) < self.context_length:
                    queued.append(self._launch(None, after=queued[-1], mode=mode))
                token = self.graph.read_token(queued.pop(0))
                if queued:
                    self.cached[-1] = token  # the input of the step queued after it
                produced += 1
                stats["decode_steps"] += 1
                stats["decode_s"] = time.perf_counter() - t1
                yield token
                if token in stop_token_ids:
                    stats["finish_reason"] = "eos"
                    return
            if produced < n:
                stats["finish_reason"] = "context"
        finally:
            if queued:  # generation ended (EOS, a stop string, the consumer closed us) with a step gone ahead
                self.sync()
                back = min(len(queued), len(self.cached))  # a failed launch has reset the sequence already
                if back:
                    self._kv_popn(self.kv, SEQ_ID, back)
                    del self.cached[-back:]

    def _check_fits(self, n_total: int):
        if n_total > self.context_length:
            raise UserError(f"prompt too long: {n_total} tokens exceed the context length "
                            f"{self.context_length} of this artifact (export with a larger --context-length)")

    def _check_room(self, n_new: int):
        self._check_fits(len(self.cached) + n_new)

    def _check_ids(self, ids: np.ndarray):
        # an id past the embedding table reads outside it: garbage on the CPU, an illegal address on the GPU
        if not ids.size:
            return
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab:
            raise UserError(f"token id {lo if lo < 0 else hi} is outside this artifact's vocabulary (0..{self.vocab - 1})")

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Bring the cache to hold exactly `ids`; return the last position's logits (vocab floats)."""
        ids = [int(i) for i in ids]
        if not ids:
            raise UserError("empty prompt")
        self._check_fits(len(ids))  # the cache will hold exactly `ids` (shared prefix kept)
        self._check_ids(np.asarray(ids))
        common = 0
        for a, b in zip(self.cached, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # at least one token must run to produce logits
        if common == 0 and self.cached:
            self.reset()
        elif common < len(self.cached):
            self._kv_popn(self.kv, SEQ_ID, len(self.cached) - common)
            del self.cached[common:]
        todo = np.asarray(ids[common:], dtype=np.int32)
        out = None
        for start in range(0, len(todo), self.prefill_chunk):
            out = self._forward("prefill", todo[start:start + self.prefill_chunk])
        self.last_prefilled = len(todo)
        return self.to_host(out, self._logits_host.reshape(1, 1, -1)).reshape(-1).copy()

    def decode(self, token: int) -> np.ndarray:
        self._check_room(1)
        if not 0 <= token < self.vocab:
            self._check_ids(np.asarray([token]))
        if self.graph is not None:
            return self._graph_step(token)
        out = self._forward("decode", np.asarray([token], dtype=np.int32))
        return self.to_host(out, self._logits_host.reshape(1, 1, -1)).reshape(-1).copy()

    def prefill_logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits at every position [n, vocab] for a fresh sequence (evaluation; needs `prefill_logits`)."""
        if "prefill_logits" not in self.fn:
            raise UserError(f"{self.folder}: the artifact has no prefill_logits function")
        ids = np.asarray(ids, dtype=np.int32)
        self.reset()
        self._check_room(len(ids))
        self._check_ids(ids)
        outs = []
        for start in range(0, len(ids), self.prefill_chunk):
            chunk = ids[start:start + self.prefill_chunk]
            outs.append(self.to_host(self._forward("prefill_logits", chunk)).reshape(len(chunk), -1))
        return np.concatenate(outs, axis=0)

    # -- generation --------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str | Sequence[int] | list[dict], chat: bool = False) -> list[int]:
        if isinstance(prompt, str):
            if chat:
                return self.tokenizer.encode_chat([{"role": "user", "content": prompt}])
            return self.tokenizer.encode(prompt)
        prompt = list(prompt)
        if prompt and isinstance(prompt[0], dict):
            return self.tokenizer.encode_chat(prompt)
        return [int(i) for i in prompt]

    def generate_ids(self, ids: Sequence[int], max_new_tokens: int = 128, sampling: SamplingParams | None = None,
                     stop_token_ids: set[int] | None = None, stats: dict | None = None) -> Iterator[int]:
        """Yield generated token ids; EOS (or a stop id) is yielded, then generation ends.

        `stats` (a dict, if given) receives prefill_s, ttft_s, decode_s, decode_steps, finish_reason.
        """
        ids = [int(i) for i in ids]
        sampler = Sampler(sampling)
        stop_token_ids = self.eos_token_ids if stop_token_ids is None else set(stop_token_ids)
        stats = stats if stats is not None else {}
        history = list(ids)  # for the repetition penalty: prompt and output, as transformers does
        t0 = time.perf_counter()
        logits = self.prefill(ids)
        stats.update(prompt_tokens=len(ids), prefilled_tokens=self.last_prefilled,
                     prefill_s=time.perf_counter() - t0, decode_steps=0, decode_s=0.0, finish_reason="length")
        for i in range(max_new_tokens):
            token = sampler(logits, history)
            if i == 0:
                stats["ttft_s"] = time.perf_counter() - t0
                t1 = time.perf_counter()
            history.append(token)
            yield token
            if token in stop_token_ids:
                stats["finish_reason"] = "eos"
                break
            if i + 1 == max_new_tokens:
                break
            if len(self.cached) >= self.context_length:
                stats["finish_reason"] = "context"
                break
            p = sampler.params
            plain_greedy = p.greedy and p.repetition_penalty == 1.0
            if self.overlap and (plain_greedy or self.overlap_sampling):
                if not plain_greedy:  # the device's sampler (at temperature 0: greedy after the penalty)
                    self._set_sampling(p, history)
                yield from self._decode_overlapped(token, max_new_tokens - i - 1, stop_token_ids, stats, t1,
                                                   "argmax" if plain_greedy else "sample")
                return
            logits = self.decode(token)
            stats["decode_steps"] += 1
            stats["decode_s"] = time.perf_counter() - t1

    def stream(self, prompt: str | Sequence[int] | list[dict], max_new_tokens: int = 128,
               sampling: SamplingParams | None = None, stop: Sequence[str] = (), chat: bool = False,
               stats: dict | None = None) -> Iterator[str]:
        """Yield text pieces as they are generated (whole UTF-8 characters; stop strings cut out)."""
        stats = stats if stats is not None else {}
        ids = self.prompt_ids(prompt, chat)
        decoder = self.tokenizer.stream_decoder()
        stops = StopStrings(stop)
        out_ids = stats.setdefault("token_ids", [])
        eos = self.eos_token_ids
        gen = self.generate_ids(ids, max_new_tokens, sampling, eos, stats)
        for token in gen:
            out_ids.append(token)
            if token in eos:
                continue  # the special token itself is not shown
            piece = stops.feed(decoder.put(token))
            if piece:
                yield piece
            if stops.hit is not None:
                stats["finish_reason"] = "stop"
                stats["stop"] = stops.hit
                gen.close()
                return
        tail = stops.feed(decoder.flush())
        tail += stops.flush()
        if stops.hit is not None:
            stats["finish_reason"] = "stop"
        if tail:
            yield tail

    def generate(self, prompt: str | Sequence[int] | list[dict], max_new_tokens: int = 128,
                 sampling: SamplingParams | None = None, stop: Sequence[str] = (), chat: bool = False,
                 **sampling_kwargs) -> GenerationResult:
        """Generate a completion. `prompt`: text, token ids, or chat messages; chat=True wraps text as a user turn."""
        if sampling is None:
            sampling = SamplingParams(**sampling_kwargs)
        stats: dict[str, Any] = {}
        if isinstance(prompt, (list, tuple)) and prompt and not isinstance(prompt[0], dict) and not stop \
                and not self._has_tokenizer():
            # token ids in, token ids out: no tokenizer needed (weights-less speed artifacts)
            tokens = list(self.generate_ids(prompt, max_new_tokens, sampling, None, stats))
            text = ""
        else:
            text = "".join(self.stream(prompt, max_new_tokens, sampling, stop, chat, stats))
            tokens = stats["token_ids"]
        return GenerationResult(text=text, token_ids=tokens, prompt_tokens=stats["prompt_tokens"],
                                prefilled_tokens=stats["prefilled_tokens"], finish_reason=stats["finish_reason"],
                                ttft_s=stats.get("ttft_s", float("nan")), decode_s=stats["decode_s"], timings=stats)
