"""Export pipeline: checkpoint folder -> nn.Module -> compiled library + weights -> artifact folder.

    export_checkpoint(checkpoint, target, out)    # AWQ GEMM or FP16 Hugging Face folder
    export_config(hf_config, target, out, ...)    # no weights: the manifest lists the params to synthesize

Everything is written into a temporary folder beside `out` and renamed into place only when complete.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from export.errors import UserError
from tvm_kernels.layout import GROUP_SIZES
from export.model import FAMILIES, ModelConfig, build_module, config_from_hf, family_of, functions_of
from export.weights import (LinearSource, QuantConfig, SafetensorsFolder, quant_config, read_config,
                            tokenizer_files)

LIBRARY = "model.so"
PARAMS = "params.safetensors"  # the weights when they fit one shard; else params-0000i-of-0000N.safetensors
SHARD_BYTES = 1 << 30  # at most this many bytes of tensor data per shard (a larger tensor gets one alone)
DEFAULT_PAGE_SIZE = 16


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=None, leave=False)


# ---------------------------------------------------------------------------------------------
# target + toolchain checks (before anything is built or written)

def resolve_target(name: str):
    from tvm_kernels.errors import UserError as KernelsError
    from tvm_kernels.targets import get_target

    try:
        dt = get_target(name)
    except KernelsError as e:
        raise UserError(f"--target: {e}") from None
    if dt.is_cuda and shutil.which("nvcc") is None:
        raise UserError(f"--target {dt.name}: needs nvcc (the CUDA toolkit) on PATH to build cubins; none found")
    if dt.cross_compiler and shutil.which(dt.cross_compiler) is None:
        raise UserError(f"--target {dt.name}: needs the cross compiler {dt.cross_compiler} on PATH "
                        f"(apt-get install g++-aarch64-linux-gnu)")
    if dt.is_cuda:
        # The stub libcuda must be loaded before tvm's CUDA runtime; a process that imported tvm first
        # cannot build CUDA any more.
        from tvm_kernels.cuda_env import prepare_cuda_build
        from tvm_kernels.errors import UserError as KernelsError2

        try:
            prepare_cuda_build()
        except KernelsError2 as e:
            raise UserError(f"--target {dt.name}: {e}") from None
    return dt


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise UserError(f"--out {out}: already exists (pass --force to replace it)")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: parent folder {out.parent} does not exist")


def _check_group(cfg: ModelConfig, where: str) -> None:
    if cfg.group_size is None:
        return
    G = cfg.group_size
    H, D = cfg.num_attention_heads, cfg.head_dim
    for k in (cfg.hidden_size, H * D, cfg.intermediate_size):
        if k % G:
            raise UserError(f"{where}: in_features {k} is not a multiple of group size {G}")


# ---------------------------------------------------------------------------------------------
# weights in the module's parameter order

def interleave_halves(a: np.ndarray) -> np.ndarray:
    """Rows [g_0 .. g_n-1, u_0 .. u_n-1] -> [g_0, u_0, g_1, u_1, ...] (the fused gate_up layout)."""
    g, u = np.split(a, 2)
    return np.stack([g, u], axis=1).reshape(a.shape)


class _Params:
    """Produces each parameter of the module from the checkpoint, fusing q/k/v and gate/up."""

    FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

    def __init__(self, cfg: ModelConfig, arch: str, src: LinearSource):
        self.cfg, self.fam, self.src = cfg, FAMILIES[arch], src
        self._cached: tuple[str, dict[str, np.ndarray]] = ("", {})
        found = [p for p in self.fam.weight_prefixes if f"{p}embed_tokens.weight" in src.tensors]
        if not found:
            raise UserError(f"{src.tensors.folder}: no {self.fam.weight_prefixes[0]}embed_tokens.weight in the "
                            f"checkpoint (is it a {self.fam.name} model?)")
        self.prefix = found[0]
        # the INT8 table (export/lm_head.py): the lm_head, or the embedding a tied model shares with it
        self.int8_table = None if cfg.lm_head != "int8" else "model.embed_tokens" if cfg.tie_word_embeddings else "lm_head"

    def _hf(self, ours: str) -> str:
        # "model.layers.3.self_attn.q_proj" in our tree -> the checkpoint's name
        renames = dict(self.fam.renames)  # a component renamed to "" is dropped (OPT's fc1 sits in the layer)
        parts = (renames.get(c, c) for c in ours.removeprefix("model.").split("."))
        return self.prefix + ".".join(p for p in parts if p)

    def _linear(self, prefix: str) -> dict[str, np.ndarray]:
        parent, leaf = prefix.rsplit(".", 1)
        parts = [f"{parent}.{p}" for p in self.FUSED.get(leaf, (leaf,))]
        hf = [self._hf(p) for p in parts]
        out: dict[str, np.ndarray] = {}
        if self.cfg.group_size is not None:
            missing = [h for h in hf if not self.src.is_quantized(h)]
            if missing:
                raise UserError(f"{self.src.tensors.folder}: {missing[0]} is not quantized (no qweight); "
                                "export needs every decoder linear in AWQ GEMM form")
            w, s, z = zip(*(self.src.kernel_layout(h) for h in hf))
            out.update(weight=np.concatenate(w), scales=np.concatenate(s), zeros=np.concatenate(z))
        else:
            out["weight"] = np.concatenate([self.src.fp16(h) for h in hf])
        biases = [self.src.bias(h) for h in hf]
        if any(b is not None for b in biases):
            if any(b is None for b in biases):
                raise UserError(f"{self.src.tensors.folder}: only some of {', '.join(hf)} have a bias")
            out["bias"] = np.concatenate(biases)
        if leaf == "gate_up_proj":
            # rows interleaved, gate_j then up_j: the decode GEMV's thread holds both rows of a pair and
            # writes act(gate_j) * up_j (tvm_kernels/gemv_w4a16.py, export/model.py MLP)
            out = {k: interleave_halves(v) for k, v in out.items()}
        return out

    def get(self, name: str) -> np.ndarray:
        prefix, leaf = name.rsplit(".", 1)
        if prefix == self.int8_table:
            if self._cached[0] != prefix:
                from export.lm_head import quantize_table

                hf = self.fam.lm_head if prefix == "lm_head" else self._hf(f"{prefix}.weight")
                q, s = quantize_table(self.src.tensors.get(hf), self.cfg.lm_head_group_size)
                self._cached = (prefix, {"weight": q, "scales": s})
            return self._cached[1][leaf]
        if prefix.endswith("_proj"):
            if self._cached[0] != prefix:
                self._cached = (prefix, self._linear(prefix))
            return self._cached[1][leaf]
        if name == "lm_head.weight":
            return self.src.tensors.get(self.fam.lm_head).astype(np.float16)
        return self.src.tensors.get(self._hf(name)).astype(np.float16)


def _safetensors_header(params: list[dict[str, Any]]) -> bytes:
    codes = {"float16": "F16", "float32": "F32", "uint32": "U32", "int32": "I32", "int8": "I8", "uint8": "U8"}
    header, offset = {}, 0
    for p in params:
        n = int(np.prod(p["shape"], dtype=np.int64)) * np.dtype(p["dtype"]).itemsize
        header[p["name"]] = {"dtype": codes[p["dtype"]], "shape": list(p["shape"]), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format asks data to start 8-aligned
    return struct.pack("<Q", len(raw)) + raw


def write_params(path: Path, params: list[dict[str, Any]], get: Callable[[str], np.ndarray], bar=None) -> None:
    """Stream a safetensors file tensor by tensor (the header is known from the shapes), so memory
    holds one fused linear at a time rather than the whole model."""
    own = bar is None
    bar = _progress(len(params), "weights") if own else bar
    with open(path, "wb") as f:
        f.write(_safetensors_header(params))
        for p in params:
            arr = np.ascontiguousarray(get(p["name"]))
            if list(arr.shape) != list(p["shape"]) or str(arr.dtype) != p["dtype"]:
                raise UserError(f"checkpoint tensor for {p['name']}: {arr.dtype}{list(arr.shape)}, the module "
                                f"expects {p['dtype']}{p['shape']} (config.json and weights disagree)")
            f.write(arr.tobytes())
            bar.update(1)
    if own:
        bar.close()


def _nbytes(p: dict[str, Any]) -> int:
    return int(np.prod(p["shape"], dtype=np.int64)) * np.dtype(p["dtype"]).itemsize


def plan_shards(params: list[dict[str, Any]], shard_bytes: int) -> list[list[dict[str, Any]]]:
    """Consecutive params grouped into shards of at most `shard_bytes` of data each, in manifest order."""
    shards: list[list[dict[str, Any]]] = []
    size = 0
    for p in params:
        n = _nbytes(p)
        if not shards or (shards[-1] and size + n > shard_bytes):
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += n
    return shards


def write_sharded_params(folder: Path, params: list[dict[str, Any]], get: Callable[[str], np.ndarray],
                         shard_bytes: int = SHARD_BYTES) -> list[str]:
    """Write the weights as `params.safetensors`, or as shards params-0000i-of-0000N.safetensors when
    they exceed `shard_bytes`; sets each param's "file". Returns the file names."""
    if shard_bytes < 1:
        raise UserError(f"shard size {shard_bytes}: expected a positive number of bytes")
    shards = plan_shards(params, shard_bytes)
    names = [PARAMS] if len(shards) == 1 else [f"params-{i:05d}-of-{len(shards):05d}.safetensors"
                                               for i in range(1, len(shards) + 1)]
    bar = _progress(len(params), "weights")
    for name, group in zip(names, shards):
        for p in group:
            p["file"] = name
        write_params(folder / name, group, get, bar)
    bar.close()
    return names


# ---------------------------------------------------------------------------------------------
# build

def build_library(cfg: ModelConfig, device_target, kernels: str, graph_mode: str | None, pdl: bool):
    """Compile the module; returns (executable, params list [{name, shape, dtype}]). `pdl`: kernels launch
    with programmatic dependent launch (tvm_kernels/pdl.py; `resolve_pdl` gives the value); `graph_mode`
    from cuda_graph_mode (only "regions" changes the build)."""
    import tvm
    from tvm import relax

    from export.kernels import attention_kernels, make_argmax_op, make_linear_op, make_norm_ops, make_sample_op
    from export.lm_head import make_lm_head_op

    target = device_target.tvm_target()
    with target:
        linear_op = make_linear_op(kernels, device_target) if cfg.group_size is not None else None
        lm_head_ops = make_lm_head_op(device_target) if cfg.lm_head == "int8" else None
        module, spec = build_module(cfg, linear_op, make_norm_ops(device_target),
                                    lambda rope_mode: attention_kernels(device_target, rope_mode), lm_head_ops,
                                    make_argmax_op(device_target), make_sample_op(device_target))
        mod, named = module.export_tvm(spec=spec)
        params = [{"name": n, "shape": [int(d) for d in p.shape], "dtype": str(p.dtype)} for n, p in named]
        config = {"relax.backend.use_cuda_graph": graph_mode == "regions"}
        if device_target.is_cuda:
            from tvm_kernels.gemm_w4a16 import BUILD_CONFIG
            from tvm_kernels.pdl import apply_pdl

            config.update(BUILD_CONFIG)  # the prefill GEMM's cp.async pipeline (synchronous copies without it)
            pipeline = relax.get_default_pipeline(target)
            if pdl:  # after scheduling, on the final PrimFuncs (the KV cache's own kernels included)
                pipeline = tvm.transform.Sequential([pipeline, apply_pdl(device_target)])
        else:
            from export.cpu_schedule import cpu_pipeline

            pipeline = cpu_pipeline(target)
        with tvm.transform.PassContext(opt_level=3, config=config):
            ex = tvm.compile(mod, target=target, relax_pipeline=pipeline)
    return ex, params


def _export_library(ex, path: Path, device_target) -> None:
    kwargs = {"cc": device_target.cross_compiler} if device_target.cross_compiler else {}
    ex.export_library(str(path), **kwargs)
    if device_target.is_cuda:
        from tvm_kernels.cuda_env import check_cubin

        check_cubin(path, device_target.arch)


def resolve_pdl(pdl: str, dt) -> bool:
    """export --pdl auto|on|off -> whether this export launches with PDL (tvm_kernels/pdl.py); auto = where
    the target has it (sm_90 and newer)."""
    if pdl not in ("auto", "on", "off"):
        raise UserError(f"--pdl {pdl!r}: expected auto, on or off")
    if pdl == "on" and not dt.pdl:
        raise UserError(f"--pdl on: target {dt.name} has no programmatic dependent launch (sm_90 and newer)")
    return dt.pdl if pdl == "auto" else pdl == "on"


def _target_manifest(dt, pdl: bool) -> dict[str, Any]:
    return {"name": dt.name, "device": "cuda" if dt.is_cuda else "cpu", "tvm_target": str(dt.tvm_target()),
            "host_triple": dt.host_triple, "arch": dt.arch, "description": dt.description,
            "programmatic_dependent_launch": pdl}


CUDA_GRAPH_MODES = ("auto", "step", "regions", "off")


def cuda_graph_mode(dt, requested: str = "auto") -> str | None:
    """export --cuda-graph -> how decode is replayed from CUDA graphs: "decode-step" (auto, step: the runtime
    captures the whole step, runtime/cuda_graph.py), "regions" (TVM's relax.backend.use_cuda_graph: the
    static stretches between KV-cache calls) or None (off, CPU targets). The two exclude each other: a
    graph launch inside a capture is refused."""
    if requested not in CUDA_GRAPH_MODES:
        raise UserError(f"--cuda-graph {requested!r}: expected one of {', '.join(CUDA_GRAPH_MODES)}")
    if not dt.is_cuda or requested == "off":
        return None
    return "regions" if requested == "regions" else "decode-step"


def _cuda_graph_manifest(dt, mode: str | None) -> dict[str, Any]:
    if not dt.is_cuda:
        return {"capturable": False, "mode": None, "why": "CPU target: no CUDA graphs"}
    if mode is None:
        return {"capturable": False, "mode": None, "why": "exported with --cuda-graph off"}
    if mode == "decode-step":
        return {"capturable": True, "mode": mode,
                "why": "the runtime captures each decode step (embed + decode, the KV cache's attention calls "
                       "included) as one CUDA graph and replays it with one launch, one graph per layout of the KV "
                       "cache's page-table arrays (it moves every 4 pages; runtime/cuda_graph.py)"}
    return {"capturable": True, "mode": mode,
            "why": "built with relax.backend.use_cuda_graph: the VM captures the static-shape regions of "
                   "decode between paged-KV-cache calls into CUDA graphs on the first call and replays them "
                   "(vm.builtin.cuda_graph.run_or_capture); the attention calls themselves run outside the graphs"}


def _created_by(extra: dict[str, Any]) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("awq-edge")
    except PackageNotFoundError:
        v = "dev"
    return {"tool": "awq-edge export", "version": v, "command": " ".join(sys.argv),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}


def _publish(tmp: Path, out: Path, force: bool) -> None:
    if out.exists():
        if not force:
            raise UserError(f"--out {out}: appeared while exporting (pass --force to replace it)")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def _write_artifact(out: Path, force: bool, fill: Callable[[Path], None]) -> Path:
    out = Path(out).absolute()
    _check_out(out, force)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        _publish(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _kv_manifest(cfg: ModelConfig) -> dict[str, Any]:
    # sliding_window is the cache's whole-sequence window (create_kv_cache's support_sliding_window),
    # unused; per-layer windows (Gemma3's local layers) are compiled into the library: the cache
    # attends those layers over their last layer_sliding_window tokens and keeps every token for the others.
    sliding = cfg.sliding_layers()
    return {"page_size": DEFAULT_PAGE_SIZE, "max_total_seq_len": cfg.context_length,
            "prefill_chunk_size": cfg.prefill_chunk_size, "max_batch_size": 1, "sliding_window": 0,
            "layer_sliding_window": cfg.sliding_window if any(sliding) else 0,
            "sliding_layers": [i for i, s in enumerate(sliding) if s], "dtype": "float16"}


def export_checkpoint(checkpoint: Path, target: str, out: Path, *, force: bool = False,
                      context_length: int | None = None, prefill_chunk: int | None = None,
                      kernels: str = "tvm_kernels", cuda_graph: str = "auto",
                      shard_bytes: int = SHARD_BYTES, lm_head: str = "fp16", pdl: str = "auto") -> dict[str, Any]:
    """Export an AWQ GEMM or FP16 Hugging Face checkpoint folder. Returns a summary (times, sizes).
    The weights go to one params.safetensors, or to shards of at most `shard_bytes` of data each.
    `lm_head` "int8": weight-only INT8 lm_head (export/lm_head.py)."""
    from export.lm_head import check_lm_head
    from runtime.manifest import Manifest

    checkpoint = Path(checkpoint)
    if shard_bytes < 1:
        raise UserError(f"shard size {shard_bytes}: expected a positive number of bytes")
    if not checkpoint.is_dir():
        raise UserError(f"CHECKPOINT {checkpoint}: no such folder")
    t0 = time.perf_counter()
    _check_out(Path(out).absolute(), force)
    hf = read_config(checkpoint)
    where = str(checkpoint / "config.json")
    arch, _ = family_of(hf, where)
    quant = quant_config(hf, checkpoint)
    cfg = config_from_hf(hf, where, group_size=quant.group_size if quant else None,
                         context_length=context_length, prefill_chunk_size=prefill_chunk)
    cfg.lm_head, cfg.lm_head_group_size = lm_head, check_lm_head(lm_head, cfg.hidden_size)
    _check_group(cfg, where)
    tok_files, template = tokenizer_files(checkpoint)
    tensors = SafetensorsFolder(checkpoint)
    source = _Params(cfg, arch, LinearSource(tensors, quant))
    dt = resolve_target(target)
    use_pdl = resolve_pdl(pdl, dt)
    graph_mode = cuda_graph_mode(dt, cuda_graph)
    summary: dict[str, Any] = {}

    def fill(tmp: Path) -> None:
        t1 = time.perf_counter()
        ex, params = build_library(cfg, dt, kernels, graph_mode, use_pdl)
        _export_library(ex, tmp / LIBRARY, dt)
        t2 = time.perf_counter()
        files = write_sharded_params(tmp, params, source.get, shard_bytes)
        t3 = time.perf_counter()
        for f in tok_files:
            shutil.copy2(f, tmp / f.name)
        manifest = Manifest(
            model={**cfg.as_manifest(), "source": str(checkpoint.absolute())}, target=_target_manifest(dt, use_pdl),
            library=LIBRARY, params=params, functions=functions_of(dt), kv_cache=_kv_manifest(cfg),
            tokenizer={"files": [f.name for f in tok_files], "chat_template": template,
                       "bos_token_id": cfg.bos_token_id, "eos_token_ids": cfg.eos_token_ids},
            quantization=quant.as_manifest() if quant else None, tvm_version=_tvm_version(),
            cuda_graph=_cuda_graph_manifest(dt, graph_mode),
            created_by=_created_by({"kernels": kernels if quant else "fp16 (dlight default schedules)",
                                    "lm_head": lm_head}),
        )
        manifest.write(tmp)
        summary.update(compile_s=round(t2 - t1, 2), weights_s=round(t3 - t2, 2),
                       library_bytes=(tmp / LIBRARY).stat().st_size,
                       params_bytes=sum((tmp / f).stat().st_size for f in files), params_files=len(files))

    path = _write_artifact(Path(out), force, fill)
    summary.update(out=str(path), total_s=round(time.perf_counter() - t0, 2), target=dt.name,
                   quantized=quant is not None)
    summary["artifact_bytes"] = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return summary


def export_config(hf_config: dict[str, Any], target: str, out: Path, *, group_size: int | None = None,
                  force: bool = False, context_length: int | None = None, prefill_chunk: int | None = None,
                  kernels: str = "tvm_kernels", cuda_graph: str = "auto",
                  tokenizer_dir: Path | None = None, pdl: str = "auto", lm_head: str = "fp16") -> dict[str, Any]:
    """Export from a transformers config dict alone: the library and a manifest whose params have
    `"file": null`, for a benchmark to fill with random weights in the kernel layout (W4 linears:
    `weight` uint32 [N, K/8], `scales`/`zeros` float16 [N, K/G] (zeros integers 0..15); the INT8 table of
    `lm_head` "int8" int8 with float16 scales; the rest float16). `group_size` None exports FP16 linears."""
    from export.lm_head import check_lm_head
    from runtime.manifest import Manifest

    t0 = time.perf_counter()
    where = "config"
    family_of(hf_config, where)
    if group_size is not None and group_size not in GROUP_SIZES:
        raise UserError(f"group size {group_size}: the kernels support 32, 64 and 128")
    cfg = config_from_hf(hf_config, where, group_size=group_size, context_length=context_length,
                         prefill_chunk_size=prefill_chunk)
    cfg.lm_head, cfg.lm_head_group_size = lm_head, check_lm_head(lm_head, cfg.hidden_size)
    _check_group(cfg, where)
    tok_files, template = tokenizer_files(tokenizer_dir) if tokenizer_dir else ([], None)
    dt = resolve_target(target)
    use_pdl = resolve_pdl(pdl, dt)
    graph_mode = cuda_graph_mode(dt, cuda_graph)
    quant = QuantConfig(4, group_size, True) if group_size else None
    summary: dict[str, Any] = {}

    def fill(tmp: Path) -> None:
        ex, params = build_library(cfg, dt, kernels, graph_mode, use_pdl)
        _export_library(ex, tmp / LIBRARY, dt)
        for p in params:
            p["file"] = None
        for f in tok_files:
            shutil.copy2(f, tmp / f.name)
        manifest = Manifest(
            model={**cfg.as_manifest(), "source": None, "weights": "synthesize"}, target=_target_manifest(dt, use_pdl),
            library=LIBRARY, params=params, functions=functions_of(dt), kv_cache=_kv_manifest(cfg),
            tokenizer={"files": [f.name for f in tok_files], "chat_template": template,
                       "bos_token_id": cfg.bos_token_id, "eos_token_ids": cfg.eos_token_ids},
            quantization=quant.as_manifest() if quant else None, tvm_version=_tvm_version(),
            cuda_graph=_cuda_graph_manifest(dt, graph_mode),
            created_by=_created_by({"kernels": kernels if quant else "fp16 (dlight default schedules)",
                                    "weights": "none (synthesize from the manifest)"}),
        )
        manifest.write(tmp)
        summary["library_bytes"] = (tmp / LIBRARY).stat().st_size

    path = _write_artifact(Path(out), force, fill)
    summary.update(out=str(path), total_s=round(time.perf_counter() - t0, 2), target=dt.name)
    return summary


def synthesize_params(params: list[dict[str, Any]], rng: np.random.Generator) -> Iterator[tuple[str, np.ndarray]]:
    """Random weights for a weights-less manifest, in the manifest's order (numpy; a benchmark may move
    each to the device as it comes). Magnitudes keep activations finite through many layers."""
    for p in params:
        shape, dtype, name = tuple(p["shape"]), p["dtype"], p["name"]
        if dtype == "uint32":
            arr = rng.integers(0, 2**32, size=shape, dtype=np.uint32)
        elif dtype == "int8":
            arr = rng.integers(-127, 128, size=shape, dtype=np.int8)
        elif name.endswith(".zeros"):
            arr = np.full(shape, 8, np.float16)
        elif name.endswith(".scales"):
            arr = (rng.random(shape, dtype=np.float32) * 0.002 + 0.001).astype(np.float16)
        elif name.endswith("norm.weight"):
            arr = np.ones(shape, np.float16)
        else:
            arr = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
        yield name, arr


def _tvm_version() -> str:
    import tvm

    return str(tvm.__version__)
