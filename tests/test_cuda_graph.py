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
    from runtime.cuda_graph import graph_key, pages_per_key, pages_spanned

    # page_size 16: tokens 1..16 in one page, the 17th opens the second
    assert [pages_spanned(n, 16) for n in (1, 15, 16, 17, 32, 33)] == [1, 1, 1, 2, 2, 3]
    # TVM 0.27 aligns each aux array to 16 bytes = 4 int32 page ids: one graph per 4 pages (64 tokens);
    # libraries of another version: one per page
    assert [graph_key(n, 16) for n in (1, 64, 65, 128, 129)] == [1, 1, 2, 2, 3]
    assert pages_per_key("0.27.0.post1") == 4 and pages_per_key("0.28.0") == 1
    assert [graph_key(n, 16, pages_per_key("0.28.0")) for n in (16, 17)] == [1, 2]


class _FakeTensor:
    def __init__(self, array):
        self.array, self.dtype, self.shape = array, str(array.dtype), array.shape

    def data_ptr(self):
        return self.array.ctypes.data


class _FakeLib:
    """What StepGraph calls directly on libcudart (error paths, graph updates)."""

    def __init__(self, cuda):
        self.cuda, self.update_fails = cuda, False

    def cudaStreamEndCapture(self, stream, graph_ref):
        self.cuda.log.append("end_capture_after_error")
        return 0

    def cudaGetLastError(self):
        return 0

    def cudaGraphDestroy(self, graph):
        return 0

    def cudaGraphExecUpdate(self, exec_, graph, info):
        self.cuda.log.append("update")
        if self.update_fails:
            return 1
        self.cuda.exec_ops = list(self.cuda.graph_ops)
        return 0

    def cudaGraphExecDestroy(self, exec_):
        return 0

    def cudaFreeHost(self, ptr):
        return 0


class _FakeCuda:
    """Records the CUDA calls; memcpys move numpy bytes, so the data path is checked too. While capturing,
    copies are recorded instead of run, and a launch runs the instantiated (or updated) graph's copies."""

    def __init__(self):
        self.log, self.capturing, self.graph_ops, self.exec_ops = [], False, [], []
        self.lib = _FakeLib(self)

    def pinned(self, n, dtype):
        import numpy as np

        a = np.zeros(n, dtype=dtype)
        return a, a.ctypes.data

    @staticmethod
    def _copy(dst, src, nbytes):
        import ctypes

        ctypes.memmove(dst, src, nbytes)

    def __call__(self, name, *args):
        self.log.append(name)
        if name == "cudaMemcpyAsync":
            op = (args[0], args[1], args[2])
            if self.capturing:
                self.graph_ops.append(op)
            else:
                self._copy(*op)
        elif name == "cudaStreamBeginCapture":
            self.capturing, self.graph_ops = True, []
        elif name == "cudaStreamEndCapture":
            self.capturing = False
            args[1]._obj.value = 1
        elif name == "cudaGraphInstantiate":
            args[0]._obj.value = 7
            self.exec_ops = list(self.graph_ops)
        elif name == "cudaGraphLaunch":
            for op in self.exec_ops:
                self._copy(*op)


def test_step_graph_captures_once_per_aux_layout_and_moves_token_and_logits():
    import numpy as np

    from runtime.cuda_graph import AUX_ALIGN_PAGES, StepGraph

    cuda, vocab = _FakeCuda(), 8
    token_dev = np.zeros(1, dtype=np.int32)
    calls = []

    def run_step():  # "the VM": logits that depend on the token the device buffer holds
        calls.append(int(token_dev[0]))
        logits = np.arange(vocab, dtype=np.float32) + 100 * len(calls)
        return (_FakeTensor(logits),)

    g = StepGraph(cuda, stream=1, page_size=16, run_step=run_step, token_ptr=token_dev.ctypes.data, vocab=vocab,
                  tvm_version="0.27.0.post1")
    out = g.step(5, tokens_after=20)  # warm-up: run plainly, nothing captured
    assert calls == [5] and int(token_dev[0]) == 5 and out[0] == 100 and "cudaStreamBeginCapture" not in cuda.log
    keys = []
    for i, tokens_after in enumerate(range(21, 21 + 16 * AUX_ALIGN_PAGES * 2)):
        g.step(1000 + i, tokens_after)
        keys.append(g.key)
    # 21..148 tokens: pages 2..10 -> keys 1, 2, 3: three captures, one instantiation, two updates
    assert g.counts["captures"] == 3 and g.counts["instantiations"] == 1 and cuda.log.count("update") == 2
    assert g.counts["replays"] == 128 and len(calls) == 1 + 3  # the VM ran only at the warm-up and the captures
    assert sorted(set(keys)) == [1, 2, 3]
    assert int(token_dev[0]) == 1000 + 127  # the replayed graph copied the last token in
    assert out is g.logits_out and out[0] == 400  # ... and the last capture's logits out
    cuda.lib.update_fails = True  # a graph whose topology changed: instantiated anew
    g.step(7, 16 * 4 * 3 + 1)
    assert g.counts["instantiations"] == 2 and int(token_dev[0]) == 7


def test_step_graph_capture_errors_end_the_capture_and_keep_no_graph():
    import numpy as np

    from runtime.cuda_graph import StepGraph

    cuda = _FakeCuda()
    token_dev = np.zeros(1, dtype=np.int32)
    outputs = iter([np.zeros(4, np.float32), np.zeros(4, np.float16)])
    g = StepGraph(cuda, 1, 16, lambda: (_FakeTensor(next(outputs)),), token_dev.ctypes.data, 4)
    g.step(1, 2)
    with pytest.raises(RuntimeUserError, match="decode returned float16 .4,., expected float32 logits of 4"):
        g.step(2, 3)  # the capture sees the wrong logits: ended, nothing instantiated, no key
    assert "end_capture_after_error" in cuda.log and g.key is None and not g.exec.value
