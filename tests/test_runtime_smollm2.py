"""The big one: greedy output of the SmolLM2 INT4 g64 `cpu` artifact, run by the runtime, matches the
torch evaluation of the same checkpoint token for token (first 32 tokens, fixed chat prompts).

The checkpoint is RTN (round to nearest, no calibration) so that quantize + export fit in CI; the
runtime path is the same for an AWQ checkpoint (benchmarks/e2e.py checks that one on the GPU).
"""
import numpy as np
import pytest

N_TOKENS = 32
PROMPTS = ["What is the capital of France?", "Give me three tips for staying healthy."]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(tmp_path_factory, smollm2_fp16):
    torch = pytest.importorskip("torch")  # noqa: F841

    from awq_edge.cli import main
    from export.exporter import export_checkpoint

    root = tmp_path_factory.mktemp("smol_runtime")
    ckpt = root / "rtn-g64"
    assert main(["quantize", str(smollm2_fp16), "--method", "rtn", "--group-size", "64", "--out", str(ckpt),
                 "--device", "cpu"]) == 0
    art = root / "art"
    export_checkpoint(ckpt, "cpu", art, context_length=512, prefill_chunk=128)
    return ckpt, art


def test_greedy_matches_torch_evaluation_of_the_checkpoint(smol):
    import torch

    from awq_edge.checkpoint import load_awq_model
    from runtime.engine import Engine

    ckpt, art = smol
    eng = Engine(art)
    assert eng.manifest.quantization["group_size"] == 64
    model = load_awq_model(ckpt, device="cpu", dtype=torch.float32)
    for prompt in PROMPTS:
        ids = eng.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        eng.reset()
        ours = list(eng.generate_ids(ids, N_TOKENS, stop_token_ids=set()))
        ref, x = [], torch.tensor([ids])
        with torch.no_grad():
            past = None
            for _ in range(N_TOKENS):  # plain argmax with the KV cache, no EOS handling: the same loop
                out = model(x, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = int(out.logits[0, -1].argmax())
                ref.append(nxt)
                x = torch.tensor([[nxt]])
        assert ours == ref, (prompt, eng.tokenizer.decode(ours), eng.tokenizer.decode(ref))
    text = eng.generate("What is the capital of France?", chat=True, max_new_tokens=32).text
    assert "Paris" in text


def test_prefill_logits_close_to_torch(smol):
    import torch

    from awq_edge.checkpoint import load_awq_model
    from runtime.engine import Engine

    ckpt, art = smol
    eng = Engine(art, verify=False)
    model = load_awq_model(ckpt, device="cpu", dtype=torch.float32)
    ids = eng.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 12)[:200]  # > one chunk of 128
    ours = eng.prefill_logits(ids)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    # FP16 activations in the artifact vs float32 torch: same argmax nearly everywhere, small logit error
    agree = (ours.argmax(-1) == ref.argmax(-1)).mean()
    assert agree > 0.95, agree
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 0.05
