"""What sampling costs on the host, and what it does to decode speed.

  host     here: logits of the FP16 SmolLM2 reference (torch, CPU) at 64 WikiText-2 positions; for
           each sampling setting, the time of one draw by runtime.sampling.Sampler against the
           whole-vocabulary rules it replaced (RefSampler below: sort, softmax, rng.choice over all
           49152 tokens), alternating, and a check that both keep the same tokens with the same
           probabilities -> benchmarks/results/sampling_host.json
  device   on the GPU machine: decode tokens/s of artifacts under .gpu/h5 (random weights) greedy
           (overlapped, and synchronized) and sampled: on the device (overlapped, where the artifact has
           `sample`), synchronized with the host sampler, and with the sampler it replaced; alternating
           rounds in one process -> $OUT/sampling_device.json

  PYTHONPATH=. .venv/bin/python benchmarks/sampling.py host
  PYTHONPATH=/tmp/tvmrt AWQ_EDGE_TVM_LIB=$PWD/.gpu/tvmrt python3 benchmarks/sampling.py device \
      --artifacts smollm2-awq llama7b-w4 --out $OUT
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.e2e import RESULTS, SMOL_FP16, header  # noqa: E402
from runtime.sampling import Sampler, SamplingParams, repetition_penalty, softmax, top_k_filter, top_p_filter  # noqa: E402

SETTINGS = {
    "T0.7": SamplingParams(temperature=0.7),
    "T0.7 top_k 50": SamplingParams(temperature=0.7, top_k=50),
    "T0.7 top_p 0.9": SamplingParams(temperature=0.7, top_p=0.9),
    "T0.7 top_k 40 top_p 0.95": SamplingParams(temperature=0.7, top_k=40, top_p=0.95),
    "T0.7 top_k 40 top_p 0.95 rep 1.1": SamplingParams(temperature=0.7, top_k=40, top_p=0.95, repetition_penalty=1.1),
    "greedy rep 1.3": SamplingParams(repetition_penalty=1.3),
}


class RefSampler(Sampler):
    """The host sampler before 38ccf72: every filter over the whole vocabulary, then rng.choice."""

    def __call__(self, logits, previous=()):
        p = self.params
        x = repetition_penalty(np.asarray(logits, dtype=np.float32).reshape(-1), previous, p.repetition_penalty)
        if p.greedy:
            return int(np.argmax(x))
        x = top_p_filter(top_k_filter(x / np.float32(p.temperature), p.top_k), p.top_p)
        probs = softmax(x)
        return int(self.rng.choice(probs.size, p=probs))


def _real_logits(n_rows: int = 64, seqlen: int = 256) -> tuple[np.ndarray, list[int]]:
    """Rows of the model's logits over a WikiText-2 passage, and the passage's ids (the penalty's history)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SMOL_FP16)
    text = (REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw").read_text()[:20000]
    ids = tok(text, return_tensors="pt").input_ids[:, :seqlen]
    model = AutoModelForCausalLM.from_pretrained(SMOL_FP16, torch_dtype=torch.float32)
    with torch.no_grad():
        logits = model(ids).logits[0].float().numpy()
    return logits[np.linspace(8, seqlen - 1, n_rows).astype(int)], ids[0].tolist()


def cmd_host(args) -> int:
    rows, history = _real_logits(args.rows)
    report = header({"rows": len(rows), "vocab": rows.shape[1], "settings": {}})
    for name, params in SETTINGS.items():
        if params.greedy:  # an argmax either way: nothing to compare on the host
            continue
        new, ref = Sampler(params), RefSampler(params)
        same, nucleus = True, []
        for x in rows:
            ids, probs = new.survivors(x, history)
            f = top_p_filter(top_k_filter(repetition_penalty(x, history, params.repetition_penalty)
                                          / np.float32(params.temperature), params.top_k), params.top_p)
            kept = np.flatnonzero(np.isfinite(f))
            got = np.arange(x.size) if ids is None else ids
            probs = probs / probs.sum(dtype=np.float64)
            same &= np.array_equal(got, kept) and np.allclose(probs, softmax(f)[kept], rtol=2e-5, atol=1e-15)
            nucleus.append(len(kept))
        times = {"new": [], "ref": []}
        for _ in range(args.rounds):  # alternating: the host's noise hits both alike
            for label, s in (("new", new), ("ref", ref)):
                t = time.perf_counter()
                for x in rows:
                    s(x, history)
                times[label].append((time.perf_counter() - t) / len(rows) * 1e6)
        med = {k: float(np.median(v)) for k, v in times.items()}
        report["settings"][name] = {"params": vars(params), "same_survivors_and_probabilities": bool(same),
                                    "survivors_median": float(np.median(nucleus)), "survivors_max": int(max(nucleus)),
                                    "us_per_draw_median": med, "speedup": med["ref"] / med["new"], "rounds_us": times}
        print(f"{name:34s} survivors median {np.median(nucleus):6.0f} max {max(nucleus):6d}  same {same}  "
              f"new {med['new']:7.1f} us  ref {med['ref']:7.1f} us  x{med['ref'] / med['new']:.1f}", flush=True)
    out = RESULTS / args.json
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("wrote", out)
    return 0


def cmd_device(args) -> int:
    import torch  # noqa: F401  (loads libcudart.so.13 from torch's wheels before the TVM runtime)

    import runtime.engine
    from benchmarks.e2e import _device_info, _engine_ab
    from runtime.bench import bench_one

    # label -> (synchronized engine?, sampling, host sampler class). On the overlapped engine sampled decoding
    # (and greedy with a repetition penalty) runs on the device where the artifact has `sample`
    modes = {"greedy": (False, SamplingParams(), Sampler), "greedy:sync": (True, SamplingParams(), Sampler)}
    for name, params in SETTINGS.items():
        modes[name] = (False, params, Sampler)
        modes[name + " [sync, host sampler]"] = (True, params, Sampler)
        modes[name + " [sync, ref sampler]"] = (True, params, RefSampler)
    if args.device_only:  # A/B of artifacts' device samplers: the overlapped modes alone
        modes = {m: v for m, v in modes.items() if not v[0]}
    # every artifact loaded first, then each round runs them in turn: artifacts compare side by side
    engines = {art: {sync: _engine_ab(art + (":sync" if sync else "")) for sync in {v[0] for v in modes.values()}}
               for art in args.artifacts}
    for per in engines.values():
        for eng in per.values():
            bench_one(eng, 16, 8)
            bench_one(eng, 16, 8, sampling=SETTINGS["T0.7"])
    rounds = []
    on_device = {art: bool(per[False].overlap_sampling) for art, per in engines.items()}
    for i in range(args.rounds):
        for art in args.artifacts:
            for mode, (sync, params, cls) in modes.items():
                runtime.engine.Sampler = cls
                for length in args.prompt_lengths:
                    r = bench_one(engines[art][sync], length, args.gen_tokens, sampling=params)
                    rounds.append({"artifact": art, "round": i, "mode": mode, **r})
                    print(f"{art:12s} round {i} {mode:56s} {length:5d}: {r['decode_tokens_per_s']:7.1f} tok/s", flush=True)
    runtime.engine.Sampler = Sampler
    del engines
    med = {}
    for art in args.artifacts:
        for mode in modes:
            for length in args.prompt_lengths:
                v = [r["decode_tokens_per_s"] for r in rounds
                     if (r["artifact"], r["mode"], r["prompt_tokens"]) == (art, mode, length)]
                med.setdefault(art, {}).setdefault(mode, {})[length] = float(np.median(v))
    report = header({"device": _device_info(), "artifacts": args.artifacts,
                     "sampling_on_device": on_device, "median_decode_tokens_per_s": med,
                     "ratio_vs_greedy": {a: {m: {L: med[a][m][L] / med[a]["greedy"][L] for L in args.prompt_lengths}
                                             for m in modes} for a in args.artifacts},
                     "rounds": rounds})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sampling_device.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report["ratio_vs_greedy"], indent=1))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("host")
    h.add_argument("--rows", type=int, default=64)
    h.add_argument("--rounds", type=int, default=5)
    h.add_argument("--json", default="sampling_host.json")
    h.set_defaults(func=cmd_host)
    d = sub.add_parser("device")
    d.add_argument("--artifacts", nargs="+", default=["smollm2-awq", "llama7b-w4"], help="folders under .gpu/h5")
    d.add_argument("--prompt-lengths", type=int, nargs="+", default=[128, 512])
    d.add_argument("--gen-tokens", type=int, default=256)
    d.add_argument("--rounds", type=int, default=3)
    d.add_argument("--device-only", action="store_true",
                   help="only the overlapped modes (greedy, and each setting sampled on the device)")
    d.add_argument("--out", default="/tmp/out")
    d.set_defaults(func=cmd_device)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
