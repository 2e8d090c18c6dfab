"""The decode-step CUDA graph's rules that need no GPU: which artifacts get one (export) and use one
(runtime), and the page key a graph is valid for. The replay itself is checked on the GPU machine
against plain VM calls, every step's logits (benchmarks/e2e.py device-graph -> e2e_gpu_graph.json)."""
import pytest

from export.errors import UserError as ExportError
from runtime.errors import UserError as RuntimeUserError


def _cfg(sliding: bool):
    from export.model import config_from_hf

    hf = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=128,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
              max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0)
    if sliding:  # Gemma3-style local layers: a window narrower than the context
        hf.update(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", head_dim=16, sliding_window=32,
                  layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16,
                  hidden_activation="gelu_pytorch_tanh")
    return config_from_hf(hf, "config", group_size=None, context_length=256)


@pytest.mark.parametrize("sliding", [False, True])
def test_export_picks_the_graph_mode(sliding):
    from export.exporter import _cuda_graph_manifest, cuda_graph_mode, resolve_target

    cfg, gpu, cpu = _cfg(sliding), resolve_target("cuda-sm90"), resolve_target("cpu")
    assert any(cfg.sliding_layers()) is sliding
    auto = cuda_graph_mode(cfg, gpu)
    assert auto == ("regions" if sliding else "decode-step")
    assert cuda_graph_mode(cfg, gpu, "regions") == "regions"
    assert cuda_graph_mode(cfg, gpu, "off") is None and cuda_graph_mode(cfg, cpu) is None
    assert _cuda_graph_manifest(gpu, auto)["mode"] == auto and _cuda_graph_manifest(gpu, auto)["capturable"]
    assert _cuda_graph_manifest(cpu, None) == {"capturable": False, "mode": None, "why": "CPU target: no CUDA graphs"}
    if sliding:
        with pytest.raises(ExportError, match="--cuda-graph step: the model has sliding-window layers"):
            cuda_graph_mode(cfg, gpu, "step")
    else:
        assert cuda_graph_mode(cfg, gpu, "step") == "decode-step"
    with pytest.raises(ExportError, match="--cuda-graph 'always'"):
        cuda_graph_mode(cfg, gpu, "always")


class _Manifest:
    def __init__(self, cuda_graph):
        self.cuda_graph = cuda_graph


def test_runtime_uses_a_step_graph_only_where_the_artifact_allows():
    from runtime.cuda_graph import use_step_graph

    step = _Manifest({"capturable": True, "mode": "decode-step", "why": "..."})
    regions = _Manifest({"capturable": True, "mode": "regions", "why": "built with relax.backend.use_cuda_graph"})
    older = _Manifest({"capturable": True, "why": "built with relax.backend.use_cuda_graph"})  # before modes
    assert use_step_graph(step, "cuda", None, "m") is True
    assert use_step_graph(step, "cuda", False, "m") is False
    assert use_step_graph(step, "cpu", None, "m") is False
    for m in (regions, older):
        assert use_step_graph(m, "cuda", None, "m") is False
        with pytest.raises(RuntimeUserError, match="m: cannot replay decode steps from a CUDA graph: built with"):
            use_step_graph(m, "cuda", True, "m")
    with pytest.raises(RuntimeUserError, match="it runs on the CPU"):
        use_step_graph(step, "cpu", True, "m")


def test_a_graph_is_keyed_by_the_pages_the_sequence_spans():
    from runtime.cuda_graph import pages_spanned

    # page_size 16: tokens 1..16 in one page, the 17th opens the second: a re-capture every 16 steps
    assert [pages_spanned(n, 16) for n in (1, 15, 16, 17, 32, 33)] == [1, 1, 1, 2, 2, 3]
