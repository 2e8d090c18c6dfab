"""The decode-step CUDA graph's rules that need no GPU: which artifacts get one (export) and use one
(runtime), and the page key a graph is valid for. The replay itself is checked on the GPU machine
against plain VM calls, every step's logits bit for bit (benchmarks/e2e.py device-graph ->
benchmarks/results/cuda_graph_*_h100.json)."""
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
    # the mode does not depend on the model: sliding-window ones replay steps too (graph_key keys their window)
    assert any(cfg.sliding_layers()) is sliding
    assert cuda_graph_mode(gpu) == cuda_graph_mode(gpu, "step") == "decode-step"
    assert cuda_graph_mode(gpu, "regions") == "regions"
    assert cuda_graph_mode(gpu, "off") is None and cuda_graph_mode(cpu) is None
    assert _cuda_graph_manifest(gpu, "decode-step")["mode"] == "decode-step"
    assert _cuda_graph_manifest(gpu, "regions")["capturable"] and _cuda_graph_manifest(gpu, None)["mode"] is None
    assert _cuda_graph_manifest(cpu, None) == {"capturable": False, "mode": None, "why": "CPU target: no CUDA graphs"}
    with pytest.raises(ExportError, match="--cuda-graph 'always'"):
        cuda_graph_mode(gpu, "always")


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
    assert [graph_key(n, 16) for n in (1, 64, 65, 128, 129)] == [(1,), (1,), (2,), (2,), (3,)]
    assert pages_per_key("0.27.0.post1") == 4 and pages_per_key("0.28.0") == 1
    assert [graph_key(n, 16, pages_per_key("0.28.0")) for n in (16, 17)] == [(1,), (2,)]


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
        self.cuda.execs[exec_.value] = list(self.cuda.graph_ops)
        return 0

    def cudaGraphExecDestroy(self, exec_):
        self.cuda.execs.pop(exec_.value)
        return 0

    def cudaFreeHost(self, ptr):
        return 0

    def cudaEventDestroy(self, event):
        return 0


class _FakeCuda:
    """Records the CUDA calls; memcpys move numpy bytes, so the data path is checked too. While capturing,
    copies are recorded instead of run; a launch runs its instantiated (or updated) graph's copies."""

    def __init__(self):
        self.log, self.capturing, self.graph_ops, self.execs = [], False, [], {}
        self.lib = _FakeLib(self)

    def pinned(self, n, dtype):
        import numpy as np

        a = np.zeros(n, dtype=dtype)
        return a, a.ctypes.data

    def event(self):
        return 7

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
            handle = 100 + len(self.log)
            args[0]._obj.value = handle
            self.execs[handle] = list(self.graph_ops)
        elif name == "cudaGraphExecDestroy":
            self.execs.pop(args[0].value)
        elif name == "cudaGraphLaunch":
            for op in self.execs[args[0].value]:
                self._copy(*op)


def test_step_graph_captures_once_per_aux_layout_and_moves_token_and_logits():
    import numpy as np

    from runtime.cuda_graph import MAX_GRAPHS, StepGraph

    cuda, vocab = _FakeCuda(), 8
    token_dev = np.zeros(1, dtype=np.int32)
    calls = []

    def run_step(mode):  # "the VM": logits that depend on how often it ran
        assert mode == "logits"
        calls.append(int(token_dev[0]))
        return (_FakeTensor(np.arange(vocab, dtype=np.float32) + 100 * len(calls)),)

    g = StepGraph(cuda, stream=1, page_size=16, run_step=run_step, token_ptr=token_dev.ctypes.data, vocab=vocab,
                  tvm_version="0.27.0.post1")
    out = g.step(5, tokens_after=20)  # warm-up: run plainly, nothing captured
    assert calls == [5] and int(token_dev[0]) == 5 and out[0] == 100 and "cudaStreamBeginCapture" not in cuda.log
    for i, tokens_after in enumerate(range(21, 21 + 128)):
        out = g.step(1000 + i, tokens_after)
    # 21..148 tokens: pages 2..10 -> keys 1, 2, 3: three captures, three graphs, the VM run only for those
    assert list(g.graphs) == [(0, 1), (0, 2), (0, 3)] and g.counts["captures"] == 3 == g.counts["instantiations"]
    assert g.counts["replays"] == 128 and len(calls) == 1 + 3
    assert int(token_dev[0]) == 1000 + 127  # the replayed graph copied the last token in
    assert out is g.logits_out and out[0] == 400  # ... and the last capture's logits out
    # back to a shorter sequence (a new prompt): its graph is still there, no capture
    g.step(7, 30)
    assert g.counts["captures"] == 3 and int(token_dev[0]) == 7 and out[0] == 200
    # more keys than MAX_GRAPHS: the least recently used graph is updated in place, or re-instantiated
    for tokens_after in range(149, 149 + 64 * 2):
        g.step(9, tokens_after)
    assert len(g.graphs) == MAX_GRAPHS and (0, 1) in g.graphs and (0, 2) not in g.graphs
    assert cuda.log.count("update") == 1 and g.counts["instantiations"] == 4
    cuda.lib.update_fails = True  # a changed topology: the evicted graph is destroyed, a new one instantiated
    g.step(11, 64 * 6 + 1)
    assert g.counts["instantiations"] == 5 and len(cuda.execs) == MAX_GRAPHS and int(token_dev[0]) == 11
    g.close()
    assert not cuda.execs and not g.graphs


def test_sliding_window_layers_key_the_window_pages_too():
    from runtime.cuda_graph import graph_key, window_pages

    # window 64 = 4 pages of 16: once the sequence is longer, the window starts (n - 64) % 16 into its
    # first page and spans 4 pages when that is 0, else 5 (TVM's GetLayerSlidingWindowNumPages)
    assert [window_pages(n, 16, 64) for n in (0, 1, 64, 65, 80, 81)] == [0, 1, 4, 5, 4, 5]
    assert graph_key(80, 16, 4, 64) == (2, 1) and graph_key(81, 16, 4, 64) == (2, 2)
    # a long generation toggles between two window keys per page-list key: a handful of graphs in all
    keys = {graph_key(n, 16, 4, 64) for n in range(1, 257)}
    assert keys == {(1, 1), (2, 1), (2, 2), (3, 1), (3, 2), (4, 1), (4, 2)}


def test_step_graph_capture_errors_end_the_capture_and_keep_no_graph():
    import numpy as np

    from runtime.cuda_graph import StepGraph

    cuda = _FakeCuda()
    token_dev = np.zeros(1, dtype=np.int32)
    outputs = iter([np.zeros(4, np.float32), np.zeros(4, np.float16)])
    g = StepGraph(cuda, 1, 16, lambda mode: (_FakeTensor(next(outputs)),), token_dev.ctypes.data, 4)
    g.step(1, 2)
    with pytest.raises(RuntimeUserError, match="decode returned float16 .4,., expected float32 logits of 4"):
        g.step(2, 3)  # the capture sees the wrong logits: ended, nothing instantiated, no key
    assert "end_capture_after_error" in cuda.log and not g.graphs and not cuda.execs


def test_greedy_steps_feed_each_other_and_return_their_tokens_in_turn():
    import numpy as np

    from runtime.cuda_graph import StepGraph

    cuda = _FakeCuda()
    token_dev = np.zeros(1, dtype=np.int32)
    picked = np.zeros(1, dtype=np.int32)  # "argmax's output": the step's input + 1, written when the VM runs
    runs = []

    def run_step(mode):
        assert mode == "argmax"
        runs.append(int(token_dev[0]))
        picked[0] = token_dev[0] + 1
        return (_FakeTensor(picked), _FakeTensor(np.zeros(4, np.float32)))

    g = StepGraph(cuda, 1, 16, run_step, token_dev.ctypes.data, 4, tvm_version="0.27.0.post1")
    a = g.launch_token(20, token=5)  # warm-up: runs plainly
    assert runs == [5] and int(token_dev[0]) == 6 and g.read_token(a) == 6
    b = g.launch_token(21)  # captured: the VM runs once more (on the token step a left), then the graph's copies
    assert runs == [5, 6] and int(token_dev[0]) == 7 and g.read_token(b) == 7 and b != a
    # the fake replays a graph's copies only (what its kernels wrote stays as the capture left it): the
    # greedy token goes to the device buffer the next step embeds and to the other pinned slot
    picked[0] = 9
    c = g.launch_token(22)
    assert c == a and runs == [5, 6] and int(token_dev[0]) == 9 and g.read_token(c) == 9 and g.read_token(b) == 7
    # the graph does not copy a token in: a step reads what the step before left on the device
    (key,) = g.graphs
    assert key == (1, 1) and all(op[1] != g._token_in_ptr for op in cuda.execs[g.graphs[key][0].value])
    # a new generation's first token comes from the host, copied before the graph runs
    cuda.log.clear()
    g.launch_token(23, token=40)
    assert g.token_in[0] == 40 and cuda.log.index("cudaMemcpyAsync") < cuda.log.index("cudaGraphLaunch")
