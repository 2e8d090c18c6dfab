"""Split-KV decode attention: its numpy reference against plain softmax attention, the launch
configuration, and the CUDA build (the numerics on the GPU are checked by the e2e device check:
greedy tokens and perplexity of the cuda export against torch)."""
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from cuda_build import build_and_check_cubin

from tvm_kernels.decode_attention import applies_to, config, reference
from tvm_kernels.errors import UserError
from tvm_kernels.targets import get_target

REPO = Path(__file__).resolve().parent.parent


def test_reference_is_softmax_attention():
    rng = np.random.default_rng(0)
    L, H_qo, H_kv, D = 37, 6, 2, 16
    q = rng.standard_normal((H_qo, D)).astype(np.float32)
    k = rng.standard_normal((L, H_kv, D)).astype(np.float32)
    v = rng.standard_normal((L, H_kv, D)).astype(np.float32)
    out, lse = reference(q, k, v, D ** -0.5)
    for h in range(H_qo):
        s = k[:, h // 3] @ q[h] * D ** -0.5
        p = np.exp(s - s.max())
        np.testing.assert_allclose(out[h], p @ v[:, h // 3] / p.sum(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(lse[h] / np.log2(np.e), np.log(np.exp(s).sum()), rtol=1e-5)


@pytest.mark.parametrize("target", ["cuda-sm90", "jetson-orin", "jetson-orin-nano"])
@pytest.mark.parametrize("heads", [(32, 32, 128), (9, 3, 64), (32, 8, 128), (14, 2, 64)])
def test_config_fits_the_block(target, heads):
    H_qo, H_kv, D = heads
    c = config(H_qo, H_kv, D, get_target(target))
    assert c["bdx"] * c["vec"] == D and c["bdy"] == H_qo // H_kv
    assert c["bdx"] * c["bdy"] * c["bdz"] <= 512 and 1 <= c["splits"] <= 32
    assert c["bdx"] % c["merge_pieces"] == 0 and c["merge_pieces"] >= 1  # the merge's warps per block


def test_bad_heads_and_rope_mode():
    with pytest.raises(UserError, match="multiple"):
        config(9, 2, 64, get_target("cuda-sm90"))
    from tvm.relax.frontend.nn.llm.kv_cache import RopeMode

    assert applies_to(RopeMode.NORMAL) and applies_to(RopeMode.NONE) and not applies_to(RopeMode.INLINE)


_INSTALLED = textwrap.dedent(
    """
    import sys
    from tvm_kernels.cuda_env import prepare_cuda_build
    if sys.argv[1] != "cpu":
        prepare_cuda_build()
    from export.kernels import attention_kernels, make_linear_op, make_norm_ops
    from export.model import build_module, config_from_hf
    from tvm_kernels.targets import get_target
    hf = {"architectures": ["LlamaForCausalLM"], "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 1,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 64}
    cfg = config_from_hf(hf, "config.json", group_size=64)
    dt = get_target(sys.argv[1])
    with dt.tvm_target():
        module, spec = build_module(cfg, make_linear_op("tvm_kernels", dt), make_norm_ops(dt),
                                    lambda mode: attention_kernels(dt, mode))
        mod, _ = module.export_tvm(spec=spec)
    print(sorted(gv.name_hint for gv, f in mod.functions.items()
                 if getattr(f, "attrs", None) is not None and "attention" in str(f.attrs.get("awq_edge.kernel", ""))))
    """
)


@pytest.mark.parametrize("target,ours", [("cuda-sm90", True), ("cpu", False)])
def test_cuda_exports_install_the_kernel(target, ours):
    # the paged KV cache of a CUDA export decodes with this kernel and prefills with
    # tvm_kernels.prefill_attention (new tokens, and the cached pages before them); the CPU keeps TVM's here
    # (export.cpu_schedule replaces them later) (a subprocess:
    # the CUDA build set-up stays out of the test process)
    pytest.importorskip("tvm")
    if target != "cpu" and shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed: CUDA builds need the CUDA toolkit")
    proc = subprocess.run([sys.executable, "-c", _INSTALLED, target], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the cache builds its sliding-window decode kernel into every module: ours too
    expected = ["batch_decode_paged_kv_split", "batch_decode_paged_kv_split_window", "batch_prefill_paged_kv_tc",
                "batch_prefill_ragged_kv_tc"] if ours else []
    assert proc.stdout.strip().splitlines()[-1] == str(expected)


@pytest.mark.parametrize("target,arch", [("cuda-sm90", "sm_90"), ("jetson-orin", "sm_87")])
def test_cuda_build(tmp_path, target, arch):
    # head_dim 256 (Gemma3) takes 8-wide vectors, which TVM's CUDA codegen cannot emit in one piece
    build_and_check_cubin(tmp_path, target, arch, """
        from tvm_kernels.decode_attention import decode_attention
        funcs = {"attn_mha": decode_attention(32, 32, 128, t), "attn_gqa": decode_attention(3, 9, 64, t),
                 "attn_d256": decode_attention(1, 4, 256, t),
                 "attn_window": decode_attention(1, 4, 256, t, sliding_window=True),
                 # more slices than a warp has lanes (two per lane in the merge), 20 pieces of a head (4 per block)
                 "attn_s40_d80": decode_attention(2, 4, 80, t, override={"splits": 40, "merge_pieces": 4})}
    """)
