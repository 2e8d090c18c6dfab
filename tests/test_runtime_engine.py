"""runtime.Engine on a tiny Llama exported for `cpu` by export.export_checkpoint, checked against
transformers on the same (FP16-rounded) weights; plus the runtime's isolation from torch /
transformers / the TVM compiler, its CLI and its error messages."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import UserError

REPO = Path(__file__).resolve().parent.parent
PROMPT = "The capital of France is"
CONTEXT = 256
CHUNK = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_fp16):
    """(HF folder, artifact folder): 2 layers, hidden 64, the SmolLM2 vocabulary and tokenizer, FP16."""
    torch = pytest.importorskip("torch")
    import transformers as tf

    from export.exporter import export_checkpoint

    root = tmp_path_factory.mktemp("tiny_runtime")
    cfg = tf.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
                         initializer_range=0.3)  # large weights: varied tokens, clear argmax margins
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn(p.shape))
    hf = root / "hf"
    model.half().save_pretrained(hf)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm2_fp16 / f, hf / f)
    art = root / "art"
    export_checkpoint(hf, "cpu", art, context_length=CONTEXT, prefill_chunk=CHUNK)
    return hf, art


@pytest.fixture(scope="module")
def engine(tiny):
    from runtime.engine import Engine

    return Engine(tiny[1])


@pytest.fixture(scope="module")
def hf_model(tiny):
    import torch
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(str(tiny[0]), dtype=torch.float32).eval()


def _hf_greedy(hf_model, ids, n):
    import torch

    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=2)
    return out[0, len(ids):].tolist()


def _hf_logits(hf_model, ids):
    import torch

    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].numpy()


def test_greedy_matches_transformers(engine, hf_model):
    ids = engine.tokenizer.encode(PROMPT)
    ours = list(engine.generate_ids(ids, 24, stop_token_ids=set()))
    assert ours == _hf_greedy(hf_model, ids, 24)
    assert len(set(ours)) > 5  # a model that repeats one token would prove little


def test_chunked_prefill_and_decode_logits_match_transformers(engine, hf_model):
    import torch

    rng = np.random.default_rng(1)
    ids = rng.integers(3, 49152, size=150).tolist()  # > 2 chunks of 64
    ref = _hf_logits(hf_model, ids)
    scale = np.abs(ref).max()
    # the yardstick: how far transformers itself moves when run in FP16 on these weights
    with torch.no_grad():
        ref16 = hf_model.half()(torch.tensor([ids])).logits[0].float().numpy()
    hf_model.float()
    tol = 3 * np.abs(ref16 - ref).max() / scale + 1e-3
    ours = engine.prefill_logits(ids)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() / scale < tol
    # token by token (prefill of one token, then decode steps) gives the same logits
    engine.reset()
    steps = [engine.prefill(ids[:1])] + [engine.decode(t) for t in ids[1:40]]
    assert np.abs(np.stack(steps) - ref[:40]).max() / scale < tol
    # chunked prefill, then decode, continues like transformers on the whole sequence
    engine.reset()
    last = engine.prefill(ids)
    np.testing.assert_allclose(last, ours[-1], atol=1e-3 * scale)
    nxt = int(np.argmax(last))
    step = engine.decode(nxt)
    ref2 = _hf_logits(hf_model, ids + [nxt])[-1]
    assert np.abs(step - ref2).max() / scale < tol


def test_prefix_reuse_gives_the_same_tokens(engine):
    engine.reset()
    first = engine.generate(PROMPT, max_new_tokens=8)
    assert first.prefilled_tokens == first.prompt_tokens
    again = engine.generate(PROMPT, max_new_tokens=8)
    assert again.prefilled_tokens == 1  # the rest came from the KV cache
    assert again.token_ids == first.token_ids
    other = engine.generate("A different prompt entirely", max_new_tokens=8)
    engine.reset()
    assert engine.generate("A different prompt entirely", max_new_tokens=8).token_ids == other.token_ids


def test_chat_turns_reuse_the_cache(tiny, engine):
    from runtime.chat import ChatSession
    from runtime.engine import Engine

    s = ChatSession(engine, max_new_tokens=6)
    s.send("Hello!")
    _, stats = s.send("And again?")
    assert stats["prefilled_tokens"] < stats["prompt_tokens"]
    # a fresh engine given the whole conversation at once answers the same
    fresh = Engine(tiny[1], verify=False)
    ref = fresh.generate(s.messages[:-1], max_new_tokens=6)
    assert ref.text == s.messages[-1]["content"]
    s.reset()
    assert engine.cached == []


def test_terminal_chat_commands(engine):
    import io

    from runtime.chat import ChatSession, run_chat

    s = ChatSession(engine, max_new_tokens=4)
    out = io.StringIO()
    assert run_chat(engine, s, stdin=io.StringIO("Hello!\n/reset\nHello!\n/exit\nnever read\n"), stdout=out) == 0
    lines = out.getvalue().splitlines()
    assert lines[1] == "(conversation reset)" and lines[0] == lines[2]  # same answer after /reset
    assert len(s.messages) == 2


def test_stream_equals_generate_and_stop_strings(engine):
    g = engine.generate(PROMPT, max_new_tokens=16)
    assert "".join(engine.stream(PROMPT, max_new_tokens=16)) == g.text
    stop = g.text[5:9]
    cut = engine.generate(PROMPT, max_new_tokens=16, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == g.text[:g.text.index(stop)]


def test_seeded_sampling_reproducible(engine):
    a = engine.generate(PROMPT, max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=7)
    b = engine.generate(PROMPT, max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=7)
    c = engine.generate(PROMPT, max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=8)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_prompt_too_long_is_a_clear_error(engine):
    with pytest.raises(UserError, match=r"prompt too long: 300 tokens exceed the context length 256"):
        engine.generate(list(range(3, 303)), max_new_tokens=4)
    engine.reset()
    r = engine.generate(list(range(3, 253)), max_new_tokens=50)  # fits, then runs out of context
    assert r.finish_reason == "context" and r.prompt_tokens + len(r.token_ids) == CONTEXT + 1


def test_token_id_outside_the_vocabulary_is_a_clear_error(engine):
    V = engine.vocab
    with pytest.raises(UserError, match=rf"token id {V} is outside this artifact's vocabulary \(0..{V - 1}\)"):
        engine.prefill([3, 4, V])
    with pytest.raises(UserError, match=r"token id -1 is outside"):
        engine.prefill([-1, 4])
    engine.reset()
    engine.prefill([3, 4])
    with pytest.raises(UserError, match=rf"token id {V + 5} is outside"):
        engine.decode(V + 5)


def _copy(art, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(art, dst)
    return dst


def test_corrupt_files_are_named(tiny, tmp_path):
    from runtime.engine import Engine

    art = _copy(tiny[1], tmp_path)
    p = art / "params.safetensors"
    data = bytearray(p.read_bytes())
    data[-10] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"params\.safetensors: sha256 differs"):
        Engine(art)
    # without the hash check, a truncated file is still caught when read
    p.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(UserError, match=r"params\.safetensors.*(past the end|not a readable)"):
        Engine(art, verify=False)
    # a fresh copy: the library loaded above stays mapped, so it must not be overwritten in place
    art2 = tmp_path / "art2"
    shutil.copytree(tiny[1], art2)
    (art2 / "model.so").unlink()
    (art2 / "model.so").write_bytes(b"not a library")
    with pytest.raises(UserError, match=r"model\.so: sha256 differs"):
        Engine(art2)
    with pytest.raises(UserError, match=r"model\.so: cannot load"):
        Engine(art2, verify=False)
    (art2 / "model.so").unlink()
    with pytest.raises(UserError, match=r"model\.so: listed in the manifest but missing"):
        Engine(art2)
    (art / "manifest.json").write_text("{broken")
    with pytest.raises(UserError, match=r"manifest\.json: unreadable"):
        Engine(art)


def test_cli_run_and_errors(tiny, engine, capsys):
    from awq_edge.cli import main

    expected = engine.generate(PROMPT, max_new_tokens=10).text
    assert main(["run", str(tiny[1]), "--prompt", PROMPT, "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert main(["run", str(tiny[1] / "nope"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an awq-edge artifact" in err[0]
    assert main(["run", str(tiny[1]), "--prompt", "x", "--top-p", "2"]) == 2
    assert "--top-p" in capsys.readouterr().err
    # a CPU artifact has no decode-step CUDA graph: asking for one is a one-line error, auto runs without
    assert main(["run", str(tiny[1]), "--prompt", "x", "--cuda-graph", "on"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "manifest.json" in err[0] and "CUDA graph" in err[0] and "CPU" in err[0]
    assert engine.graph is None and engine.cuda_stream is None


def test_cli_bench_sampled(tiny, tmp_path, capsys):
    from awq_edge.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", str(tiny[1]), "--prompt-lengths", "8", "--gen-tokens", "6", "--temperature", "0.8",
                 "--top-p", "0.9", "--json", str(out)]) == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["sampling"]["temperature"] == 0.8 and run["sampling"]["top_p"] == 0.9
    assert [r["generated_tokens"] for r in run["results"]] == [6]
    capsys.readouterr()
    # the HF / llama.cpp baselines decode greedily: comparing sampled decode against them is refused
    assert main(["bench", str(tiny[1]), "--hf", str(tmp_path), "--temperature", "0.7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--hf" in err[0] and "--temperature" in err[0]


BLOCKER = textwrap.dedent("""
    import sys
    BLOCKED = ("torch", "transformers", "tvm", "safetensors")
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked for this test: {name}")
            return None
    sys.meta_path.insert(0, Block())
""")


def test_runtime_runs_without_torch_transformers_or_tvm_compiler(tiny, engine):
    """A subprocess where importing torch, transformers, tvm (the compiler) or safetensors fails."""
    expected = engine.generate(PROMPT, max_new_tokens=10)
    script = BLOCKER + textwrap.dedent(f"""
        import json, io, contextlib
        import runtime, runtime.engine, runtime.cli, runtime.chat, runtime.bench, runtime.bundle, runtime.sampling
        from runtime.engine import Engine
        eng = Engine({str(tiny[1])!r})
        r = eng.generate({PROMPT!r}, max_new_tokens=10)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = runtime.cli.main(["run", {str(tiny[1])!r}, "--prompt", {PROMPT!r}, "--max-new-tokens", "10"])
        bad = [m for m in sys.modules if m.split(".")[0] in BLOCKED]
        print(json.dumps({{"ids": r.token_ids, "text": r.text, "cli": buf.getvalue(), "rc": rc, "loaded": bad}}))
    """)
    # as on a board: the runtime libraries sit in a folder of their own (the tvm package cannot be found)
    from runtime.tvm_loader import find_library

    libdir = str(find_library("libtvm_runtime.so").parent)
    env = {**os.environ, "PYTHONPATH": str(REPO), "AWQ_EDGE_TVM_LIB": libdir}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["loaded"] == []
    assert out["ids"] == expected.token_ids
    assert out["text"] == expected.text and out["cli"] == expected.text + "\n" and out["rc"] == 0


def test_blocker_really_blocks():
    script = BLOCKER + "import numpy\ntry:\n    import torch\nexcept ImportError:\n    print('blocked')\n"
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "blocked"


def _fake_wheel(path: Path, files: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)


@pytest.mark.parametrize("target,cuda", [("jetson-orin", True), ("cpu-aarch64", False)])
def test_bundle_runtime_from_wheel_dir(tmp_path, target, cuda):
    import tarfile

    from awq_edge.cli import main

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _fake_wheel(wheels / "apache_tvm-0.27.0.post1-py3-none-manylinux_2_28_aarch64.whl",
                {"tvm/lib/libtvm_runtime.so": b"RT", "tvm/lib/libtvm_runtime_cuda.so": b"CU",
                 "tvm/lib/libtvm_compiler.so": b"BIG"})
    _fake_wheel(wheels / "apache_tvm_ffi-0.1.15.post2-cp310-cp310-manylinux_2_28_aarch64.whl", {"tvm_ffi/x": b""})
    out = tmp_path / "rt.tar.gz"
    assert main(["bundle-runtime", "--target", target, "--out", str(out), "--wheel-dir", str(wheels)]) == 0
    with tarfile.open(out) as t:
        names = set(t.getnames())
    lib = "awq-edge-runtime/runtime/_tvmlib/"
    assert lib + "libtvm_runtime.so" in names
    assert (lib + "libtvm_runtime_cuda.so" in names) == cuda
    assert not any("compiler" in n for n in names)
    assert "awq-edge-runtime/runtime/engine.py" in names and "awq-edge-runtime/install.sh" in names
    assert any(n.startswith("awq-edge-runtime/wheels/apache_tvm_ffi-") for n in names)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".bundle")] == []
    assert main(["bundle-runtime", "--target", target, "--out", str(tmp_path / "x.zip"), "--wheel-dir", str(wheels)]) == 2



def test_cpu_thread_default_counts_physical_cores(monkeypatch):
    import os

    from runtime import tvm_loader

    n = tvm_loader.physical_cores()
    assert 1 <= n <= (os.cpu_count() or 1)
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    tvm_loader.load_runtime("cpu")
    assert os.environ["TVM_NUM_THREADS"] == str(n)
    monkeypatch.setenv("TVM_NUM_THREADS", "1")  # an explicit setting wins
    tvm_loader.load_runtime("cpu")
    assert os.environ["TVM_NUM_THREADS"] == "1"


def test_a_failed_forward_forgets_the_sequence(engine):
    # the cache reserved room for the token before the call failed: the engine must not trust `cached`
    # afterwards, so it starts over, and the next generation equals a fresh one
    expected = engine.generate(PROMPT, max_new_tokens=6).token_ids
    assert engine.cached
    decode = engine.fn["decode"]

    def broken(*args):
        raise RuntimeError("injected")

    engine.fn["decode"] = broken
    try:
        with pytest.raises(RuntimeError, match="injected"):
            engine.decode(expected[-1])
    finally:
        engine.fn["decode"] = decode
    assert engine.cached == []
    assert engine.generate(PROMPT, max_new_tokens=6).token_ids == expected


class _HostStepGraph:
    """StepGraph's overlapped-decode interface run at once on the CPU: each queued step's VM calls (decode, then
    the artifact's argmax, or for "sample" tvm_kernels.sample.reference standing in for the CUDA-only kernel,
    into the token buffer) run when it is launched. The engine's side of overlapped decode (one step ahead, the
    token filled in later, the rollback of a step gone ahead, the sampling state) is then checked without a
    GPU; the GPU's stream and event ordering is checked on the device (benchmarks/e2e.py device-graph)."""

    def __init__(self, eng):
        self.eng, self.tokens, self.slot = eng, {}, 0

    def wait(self, slot):
        assert slot in self.tokens

    def launch_token(self, tokens_after, token=None, mode="argmax"):
        from tvm_kernels.sample import reference

        e = self.eng
        assert tokens_after == len(e.cached) + 1  # the sequence once this step is done (`cached` grows after)
        if token is not None:
            e.to_device(np.array([token], np.int32), e._token_buf)
        if mode == "argmax":
            tok = e.to_host(e._decode_calls("argmax")[0])
        else:
            logits = e.to_host(e._decode_calls("logits")[0]).reshape(-1)
            cfg, rng, seen = e.to_host(e._sample_cfg), e.to_host(e._sample_rng), e.to_host(e._sample_seen)
            tok = np.array([reference(logits, cfg[0], int(cfg[2]), cfg[1], int(rng[0]), int(rng[1]), cfg[3], seen)],
                           np.int32)
            seen[tok[0]] = 1  # the kernel advances the counter and marks the token seen
            e.to_device(rng + np.array([0, 1], np.int32), e._sample_rng)
            e.to_device(seen, e._sample_seen)
        e.to_device(tok, e._token_buf)  # what the graph's device-to-device copy does
        slot, self.slot = self.slot, self.slot ^ 1
        self.tokens[slot] = int(tok[0])
        return slot

    def read_token(self, slot):
        return self.tokens[slot]


@pytest.fixture(scope="module")
def overlapped(tiny):
    from runtime.engine import Engine

    eng = Engine(tiny[1])
    assert "argmax" in eng.fn and not eng.overlap  # CPU: no step graph, so no overlap of its own
    eng.graph, eng.overlap = _HostStepGraph(eng), True
    return eng


def test_overlapped_greedy_equals_host_greedy(engine, overlapped):
    prompt = engine.prompt_ids(PROMPT)
    first = engine.generate(PROMPT, max_new_tokens=20).token_ids
    stop = first[7]
    cases = [  # (stop ids, max tokens, consumer stops after): runs to its length, an EOS ends it, a stop string
        (set(), 20, None), ({stop}, 20, None), (set(), 20, 5),
    ]
    for stop_ids, n, close_after in cases:
        got = []
        for eng in (engine, overlapped):
            gen, toks = eng.generate_ids(prompt, n, stop_token_ids=stop_ids), []
            for t in gen:
                toks.append(t)
                if close_after and len(toks) == close_after:
                    gen.close()
            got.append((toks, list(eng.cached)))
        assert got[0] == got[1], (stop_ids, n, close_after)
        # the cache holds what `cached` says: the next turn's logits agree with the reference engine's
        extra = engine.prompt_ids(" and the capital of Italy is")
        ref, ov = engine.prefill(engine.cached + extra), overlapped.prefill(overlapped.cached + extra)
        np.testing.assert_array_equal(ref, ov)
    assert first.index(stop) <= 7 and got[0][0] == first[:5]


def test_overlapped_greedy_stops_at_the_context(engine, overlapped):
    ids = (engine.prompt_ids(PROMPT) * 60)[:CONTEXT - 6]
    res = []
    for eng in (engine, overlapped):
        stats = {}
        res.append((list(eng.generate_ids(ids, 20, stop_token_ids=set(), stats=stats)), stats["finish_reason"],
                    len(eng.cached)))
    assert res[0] == res[1] and res[0][1] == "context" and res[0][2] == CONTEXT


def _enable_sampling(eng):
    eng.overlap_sampling = True
    eng._sample_cfg, eng._sample_rng = eng.empty((4,), "float32"), eng.empty((2,), "int32")
    eng._sample_seen = eng.empty((eng.vocab,), "int32")


def test_overlapped_sampling_draws_per_step_and_rolls_back(engine, overlapped):
    """Sampled decoding through the device's `sample` (its numpy reference here): the host draws the first
    token, then step i draws with counter i of the seed; a seed repeats its tokens; a generation the consumer
    ends early leaves the cache as the synchronized path does."""
    from runtime.sampling import Sampler, SamplingParams
    from tvm_kernels.sample import reference

    _enable_sampling(overlapped)
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=3)
    prompt = engine.prompt_ids(PROMPT)
    a = list(overlapped.generate_ids(prompt, 12, params, stop_token_ids=set()))
    assert a == list(overlapped.generate_ids(prompt, 12, params, stop_token_ids=set()))
    expect = [Sampler(params)(engine.prefill(prompt))]
    for i in range(11):
        expect.append(reference(engine.decode(expect[-1]), 0.9, 40, 0.9, 3, i))
    assert a == expect
    gen, toks = overlapped.generate_ids(prompt, 12, params, stop_token_ids=set()), []
    for t in gen:
        toks.append(t)
        if len(toks) == 5:
            gen.close()
    assert toks == a[:5] and overlapped.cached == prompt + a[:4]
    engine.reset()
    engine.prefill(prompt)
    for t in a[:4]:  # the cache as synchronized decoding of the same tokens leaves it
        engine.decode(t)
    extra = engine.prompt_ids(" and the capital of Italy is")
    np.testing.assert_array_equal(engine.prefill(overlapped.cached + extra), overlapped.prefill(overlapped.cached + extra))


def test_overlapped_repetition_penalty_greedy_and_sampled(engine, overlapped):
    """With a repetition penalty the device's `sample` decodes too: at temperature 0 the same tokens as the
    host's greedy sampler, sampled the reference's draws with the history marked as it grows."""
    from runtime.sampling import Sampler, SamplingParams
    from tvm_kernels.sample import reference

    _enable_sampling(overlapped)
    prompt = engine.prompt_ids(PROMPT)
    greedy = SamplingParams(repetition_penalty=0.5)  # < 1 favours the seen ids: it changes this model's tokens
    host = list(engine.generate_ids(prompt, 16, greedy, stop_token_ids=set()))
    assert list(overlapped.generate_ids(prompt, 16, greedy, stop_token_ids=set())) == host
    assert host != list(engine.generate_ids(prompt, 16, stop_token_ids=set()))  # the penalty changes them
    params = SamplingParams(temperature=0.9, top_p=0.95, repetition_penalty=1.3, seed=4)
    got = list(overlapped.generate_ids(prompt, 10, params, stop_token_ids=set()))
    engine.reset()
    expect = [Sampler(params)(engine.prefill(prompt), prompt)]
    seen = np.zeros(engine.vocab, np.int32)
    seen[prompt + expect] = 1
    for i in range(9):
        expect.append(reference(engine.decode(expect[-1]), 0.9, 0, 0.95, 4, i, 1.3, seen))
        seen[expect[-1]] = 1
    assert got == expect
