"""Weights-less cuda-sm90 exports for side-by-side experiments (benchmarks/e2e.py device-ab / device-graph),
each into .gpu/h5/NAME. A variant either exports a model shape that prepare-gpu does not build, patches one
constant of the export for the duration of its build (an experiment measured and, where it lost, not kept),
or passes export one of its options (--pdl off, --lm-head).

  .venv/bin/python benchmarks/export_variants.py NAME [NAME ...]

  llama7b-w4-fused    the 7B with its norms inside the decode GEMVs (FUSED_NORMS_MAX_HIDDEN raised to 8192)
                      -> cuda_graph_ab_h100.json (x0.97, not kept)
  smol-s32, smol-s64  SmolLM2 W4 g64 with decode attention cut into at most 32 / 64 context slices
                      -> decode_attn_splits_ab_h100.json (64: x0.85-0.91, not kept)
  llama7b-w4-sN       the 7B with decode attention cut into N context slices (config: 17 = 4 blocks per SM)
                      -> decode_attn_splits_ab_h100.json
  llama7b-w4-pfA-D   the 7B with its decode GEMVs prefetching A MB of the next GEMV's matrix into L2 after the
  smol-pfA-D          attention and D MB elsewhere (gemv_w4a16.PREFETCH_*_BYTES; 0-0 = no prefetch); SmolLM2 W4 g64
                      the same -> l2_prefetch_ab_h100.json (a -start suffix, the prefetch issued when each block
                      starts, lived in the experiment commit 553980f: x0.95-1.00, not kept)
  (llama7b-w4-tok4 and smol-tok4, decode attention with 4 K/V rows per step, lived in the experiment commit
   1ddcd8a -> decode_attn_tok_ab_h100.json: SmolLM2 x0.94-0.95, 7B x1.00, not kept)
  (llama7b-w4-lop3 / -f16x2 and smol-lop3 / -f16x2, Marlin's lop3 dequantize in the decode GEMVs where
   cuda_config picked it or nowhere, lived in the experiment commit cc67fec -> gemv_math_h100.json:
   SmolLM2 x0.96-1.00, 7B x1.00-1.02, not kept)
  (llama7b-w4-pgahead / -pgnow and smol-pgahead / -pgnow, the decode attention loading the next loop step's
   page ids during this step, lived in the experiment commit 7ee0d12 -> decode_attn_prefetch_ab_h100.json:
   SmolLM2 x0.98-0.99, 7B x1.00, not kept)
  llama7b-w4-lmhead-int8 / -fp16, smol-lmhead-int8 / -fp16
                      the 7B / SmolLM2 W4 g64 (weights-less) with the INT8 or the FP16 lm_head (export --lm-head)
                      -> lm_head_int8_gpu_ab_h100.json
  llama7b-w4-nopdl    the 7B / SmolLM2 W4 g64 without programmatic dependent launch (kernel times in a profile
  smol-nopdl          are then each kernel's own; benchmarks/_device_profile.py)
  (llama7b-w4-ppX and smol-ppX, X = none / first / slice: the decode attention's L2 prefetch of its first loop
   step's or its whole slice's pages before its PDL wait, lived in the experiment commit 6648832 ->
   decode_attn_prefetch_ab_h100.json: x0.95-1.08 in runs that disagree, not kept)
  smol-bdzN           SmolLM2 W4 g64 with N parallel token streams per decode-attention block (config: 10)
                      -> decode_attn_merge_ab_h100.json
  llama7b-w4-mpN      the 7B / SmolLM2 W4 g64 with the decode attention's merge in blocks of N warps (N pieces of a
  smol-mpN            head; decode_attention.MERGE_PIECES) -> decode_attn_merge_ab_h100.json
  gemma3-tiny         tests/tiny_models.py's Gemma3 with a 64-token window, W4 g64, context 1024
  gemma3-1b           Gemma3-1B's shapes (hidden 1152, 26 layers, 5 local : 1 global, window 512, head_dim 256), W4 g64
  gemma3-1b-regions   the same with TVM's regional CUDA graphs (--cuda-graph regions)
                      -> cuda_graph_sliding_h100.json, gemv_small_ab_h100.json (the gemma3-1b baselines there are
                         this variant exported at the commits those files' notes name)
"""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GEMMA3_1B = dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", hidden_size=1152, intermediate_size=6912,
                 num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                 max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                 sliding_window=512, query_pre_attn_scalar=256, hidden_activation="gelu_pytorch_tanh",
                 layer_types=[("full_attention" if (i + 1) % 6 == 0 else "sliding_attention") for i in range(26)],
                 tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, torch_dtype="bfloat16")


@contextlib.contextmanager
def patched(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def config_with(**values):
    """decode_attention.config with some of its values replaced (a value may be a function of the config's
    arguments)."""
    import tvm_kernels.decode_attention as da

    base = da.config

    def config(num_qo_heads, num_kv_heads, head_dim, target):
        c = base(num_qo_heads, num_kv_heads, head_dim, target)
        return {**c, **{k: v(num_qo_heads, num_kv_heads, head_dim, target) if callable(v) else v
                        for k, v in values.items()}}

    return patched(da, "config", config)


@contextlib.contextmanager
def _both(a, b):
    with a, b:
        yield


def _gemv():
    import tvm_kernels.gemv_w4a16 as gemv

    return gemv


def _attn():
    import tvm_kernels.decode_attention as da

    return da


# The 7B (W4 g128) / SmolLM2 (W4 g64) variants that patch one setting: name pattern -> the patch (a context
# manager) from the match; -sN caps the context slices at N (the shipped cap is 32).
PATCHED = {
    r"(llama7b-w4|smol)-pf(\d+)-(\d+)": lambda m: _both(
        patched(_gemv(), "PREFETCH_AFTER_ATTENTION_BYTES", int(m[2]) << 20),
        patched(_gemv(), "PREFETCH_BYTES", int(m[3]) << 20)),
    r"(llama7b-w4|smol)-mp(\d+)": lambda m: patched(_attn(), "MERGE_PIECES", int(m[2])),
    r"(smol)-bdz(\d+)": lambda m: config_with(bdz=int(m[2])),
    r"(smol)-s(32|64)": lambda m: config_with(splits=lambda hq, hkv, d, t: max(1, min(int(m[2]), -(-4 * t.num_sms // hkv)))),
    r"(llama7b-w4)-s(\d+)": lambda m: config_with(splits=int(m[2])),
}


# The 7B / SmolLM2 variants that pass export_config other arguments: name pattern -> those arguments.
OPTIONS = {
    r"(llama7b-w4|smol)-nopdl": lambda m: {"pdl": "off"},
    r"(llama7b-w4|smol)-lmhead-(int8|fp16)": lambda m: {"lm_head": m[2]},
}


def shape_variant(name: str):
    """(the context manager to build under, extra export_config arguments) for a 7B / SmolLM2 variant of
    PATCHED or OPTIONS, or None."""
    import re

    for pattern, patch in PATCHED.items():
        m = re.fullmatch(pattern, name)
        if m:
            return patch(m), {}
    for pattern, options in OPTIONS.items():
        m = re.fullmatch(pattern, name)
        if m:
            return contextlib.nullcontext(), options(m)
    return None


VARIANTS = ("llama7b-w4-fused", "gemma3-tiny", "gemma3-1b", "gemma3-1b-regions")


def export(name: str):
    import export.model as model
    from benchmarks.e2e import GPU_DIR, LLAMA2_7B, SMOL_FP16
    from export.exporter import export_config

    out = GPU_DIR / name
    found = shape_variant(name)
    if found:  # the 7B (W4 g128) or SmolLM2 (W4 g64)
        patch, options = found
        cfg, g = (LLAMA2_7B, 128) if name.startswith("llama") else (json.loads((SMOL_FP16 / "config.json").read_text()), 64)
        with patch:
            return export_config(cfg, "cuda-sm90", out, group_size=g, force=True, context_length=4096, **options)
    if name == "llama7b-w4-fused":
        with patched(model, "FUSED_NORMS_MAX_HIDDEN", 8192):
            return export_config(LLAMA2_7B, "cuda-sm90", out, group_size=128, force=True, context_length=4096)
    if name == "gemma3-tiny":
        sys.path.insert(0, str(REPO / "tests"))
        from tiny_models import tiny_config

        tiny = tiny_config("gemma3", sliding_window=64, max_position_embeddings=2048).to_dict()
        tiny["architectures"] = ["Gemma3ForCausalLM"]
        return export_config(tiny, "cuda-sm90", out, group_size=64, force=True, context_length=1024)
    if name in ("gemma3-1b", "gemma3-1b-regions"):
        mode = "regions" if name.endswith("regions") else "step"
        return export_config(GEMMA3_1B, "cuda-sm90", out, group_size=64, force=True, context_length=4096, cuda_graph=mode)
    raise AssertionError(name)  # main checked the names


def main(argv: list[str]) -> int:
    if not argv:
        raise SystemExit(__doc__)
    unknown = [n for n in argv if n not in VARIANTS and not shape_variant(n)]
    if unknown:  # before anything is built
        raise SystemExit(f"export_variants.py: unknown variant {unknown[0]!r}; expected one of {', '.join(VARIANTS)} "
                         f"or a name matching {', '.join([*PATCHED, *OPTIONS])}")
    from tvm_kernels.cuda_env import prepare_cuda_build

    prepare_cuda_build()
    for name in argv:
        print(name, export(name), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
