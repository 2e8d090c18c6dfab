"""Accuracy of `export --lm-head int8` on the real SmolLM2 AWQ g64 checkpoint (cpu artifacts).

For each artifact (e.g. one exported with --lm-head int8 and one with the default fp16): greedy tokens of
the fixed chat prompts against the torch evaluation of the same checkpoint (awq_edge.checkpoint,
float32, plain argmax with the KV cache, EOS ignored) for the first 32 tokens, and WikiText-2 perplexity
over a few 512-token windows (prefill_logits) next to torch's on the same windows.

    .venv/bin/python benchmarks/lm_head_int8_quality.py ART_INT8 ART_FP16 [--windows 8]
    -> benchmarks/results/lm_head_int8_quality.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from e2e import header  # noqa: E402

PROMPTS = ["What is the capital of France?", "Give me three tips for staying healthy.",
           "Write a short poem about the sea."]
WIKI = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[1:] under logits[:-1] (float64 log-softmax)."""
    lg = logits[:-1].astype(np.float64)
    lg -= lg.max(-1, keepdims=True)
    lp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    return float(-lp[np.arange(len(ids) - 1), ids[1:]].sum()), len(ids) - 1


def ppl(parts: list[tuple[float, int]]) -> float:
    return float(np.exp(sum(a for a, _ in parts) / sum(n for _, n in parts)))


def main(argv=None) -> int:
    import torch

    from awq_edge.checkpoint import load_awq_model
    from runtime.engine import Engine

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifacts", nargs="+", type=Path)
    p.add_argument("--checkpoint", type=Path, default=REPO / "artifacts" / "smollm2-awq-g64")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--json", default="lm_head_int8_quality.json")
    args = p.parse_args(argv)

    engines = {str(a): Engine(a) for a in args.artifacts}
    tok = next(iter(engines.values())).tokenizer
    model = load_awq_model(args.checkpoint, device="cpu", dtype=torch.float32)
    refs = {}
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tok.encode_chat([{"role": "user", "content": prompt}])
            ref, x, past = [], torch.tensor([ids]), None
            for _ in range(args.tokens):
                out = model(x, past_key_values=past, use_cache=True)
                past = out.past_key_values
                ref.append(int(out.logits[0, -1].argmax()))
                x = torch.tensor([[ref[-1]]])
            refs[prompt] = (ids, ref)
        # the first windows of the test split (a few: this is a delta check, not the PPL protocol)
        text = WIKI.read_text()[: 8 * args.seqlen * args.windows]  # ~4 characters per token: enough
        stream = np.array(tok.encode(text), dtype=np.int64)
        windows = [stream[i * args.seqlen:(i + 1) * args.seqlen] for i in range(args.windows)]
        windows = [w for w in windows if len(w) == args.seqlen]
        torch_ppl = ppl([nll(model(torch.tensor([w])).logits[0].numpy(), w) for w in windows])

    results = []
    for name, eng in engines.items():
        row = {"artifact": name, "lm_head": eng.manifest.model.get("lm_head", "fp16"),
               "lm_head_group_size": eng.manifest.model.get("lm_head_group_size"), "greedy": {}}
        for prompt, (ids, ref) in refs.items():
            eng.reset()
            ours = list(eng.generate_ids(ids, args.tokens, stop_token_ids=set()))
            prefix = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), len(ref))
            row["greedy"][prompt] = {"agree_prefix": prefix, "of": len(ref), "text": tok.decode(ours)}
        parts = []
        for w in windows:
            eng.reset()
            parts.append(nll(eng.prefill_logits([int(t) for t in w]), w))
        row["ppl"] = ppl(parts)
        row["ppl_delta_vs_torch"] = row["ppl"] - torch_ppl
        results.append(row)
        print(f"{name} (lm_head {row['lm_head']}): greedy agreement "
              + ", ".join(f"{g['agree_prefix']}/{g['of']}" for g in row["greedy"].values())
              + f"; PPL {row['ppl']:.4f} (torch {torch_ppl:.4f})")
    report = header({"device": "cpu", "checkpoint": str(args.checkpoint), "torch_ppl": torch_ppl,
                     "ppl_windows": f"{len(windows)} windows of {args.seqlen} tokens from the start of "
                                    "wiki.test.raw (no overlap)",
                     "greedy_reference": "torch float32 evaluation of the checkpoint (awq_edge.checkpoint), "
                                         "argmax with the KV cache, EOS ignored",
                     "results": results})
    out = REPO / "benchmarks" / "results" / args.json
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
