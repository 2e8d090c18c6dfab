"""Every exported family on the GPU: tiny random models -> cuda-sm90 artifacts -> the runtime on the GPU
machine, logits against transformers (float32, computed here on the same FP16 / dequantized RTN W4
weights). CI checks the same models on the CPU (tests/test_export*.py); this runs the CUDA kernels:
the W4 GEMV/GEMM, the fused norms, our split-KV decode attention and, for Gemma3's local layers,
TVM's sliding-window kernels.

  .venv/bin/python benchmarks/families_gpu.py build            # here: checkpoints, references, exports
  python3 benchmarks/families_gpu.py device --out $OUT          # GPU machine (runtime bundle on PYTHONPATH)
  .venv/bin/python benchmarks/families_gpu.py collect DEVICE_JSON

The prompt (40 tokens, prefilled in chunks of 8) is longer than the tiny Gemma3's sliding window (16);
then 8 decode steps, each compared. Tolerance as the CPU tests: 0.02 + 2% of the largest |logit|. Then the
same prompt generated greedily as `run` does (tokens picked on the GPU, overlapped steps): the same tokens;
and sampled (repetition penalty, temperature, top-k, top-p, seeded: the device's `sample`, overlapped): each
token the draw of tvm_kernels.sample.reference on the synchronized engine's logits of the same prefix.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DIR = REPO / ".gpu" / "families"
# (family, AWQ W4 or FP16, lm_head): "int8" = export --lm-head int8, against transformers with the same
# INT8-dequantized head (the tied Llama's embedding reads that table too; Qwen2's stays FP16)
CASES = [("llama", True, "fp16"), ("qwen2", True, "fp16"), ("gemma3", True, "fp16"), ("gemma3", False, "fp16"),
         ("opt", True, "fp16"), ("llama", True, "int8"), ("qwen2", False, "int8")]


def case_name(family: str, awq: bool, lm_head: str) -> str:
    return f"{family}-{'awq' if awq else 'fp16'}" + ("-lmhead-int8" if lm_head == "int8" else "")


PROMPT = [int(t) for t in np.random.default_rng(1).integers(3, 250, 40)]
STEPS = 8


def cmd_build(args) -> int:
    sys.path.insert(0, str(REPO / "tests"))
    import torch

    from test_export import make_checkpoint  # the CPU tests' tiny checkpoints, same construction
    from test_export_lm_head import _int8_head_model
    from tvm_kernels.cuda_env import prepare_cuda_build
    from tvm_kernels.gemv_w8a16 import DEFAULT_GROUP_SIZE

    prepare_cuda_build()
    from export.exporter import export_checkpoint

    DIR.mkdir(parents=True, exist_ok=True)
    for family, awq, lm_head in CASES:
        name = case_name(family, awq, lm_head)
        root = DIR / name
        subprocess.run(["rm", "-rf", str(root)], check=True)
        model = make_checkpoint(family, root / "ckpt", awq)
        if lm_head == "int8":
            model = _int8_head_model(model, DEFAULT_GROUP_SIZE)
        ids = list(PROMPT)
        with torch.no_grad():  # greedy continuation by transformers, then its logits at every position
            for _ in range(STEPS):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            ref = model(torch.tensor([ids])).logits[0].float().numpy()
        np.savez(root / "ref.npz", ids=np.array(ids, np.int32), logits=ref[len(PROMPT) - 1:])
        t = time.time()
        export_checkpoint(root / "ckpt", "cuda-sm90", root / "art", context_length=64, prefill_chunk=8, lm_head=lm_head)
        subprocess.run(["rm", "-rf", str(root / "ckpt")], check=True)
        print(name, f"exported in {time.time() - t:.0f} s", flush=True)
    return 0


def cmd_device(args) -> int:
    import torch  # noqa: F401  (libcudart.so.13 from torch's wheels, before the TVM runtime)

    from benchmarks.e2e import _reference_draws
    from runtime.engine import Engine
    from runtime.sampling import SamplingParams

    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.2, seed=5)
    rows = []
    for family, awq, lm_head in CASES:
        name = case_name(family, awq, lm_head)
        ref = np.load(DIR / name / "ref.npz")
        ids, want = [int(i) for i in ref["ids"]], ref["logits"]
        eng = Engine(DIR / name / "art", device="cuda")
        got = [eng.prefill(ids[:len(PROMPT)])]
        for t in ids[len(PROMPT):]:
            got.append(eng.decode(t))
        got = np.stack(got)[: len(want)]
        tol = 0.02 + 0.02 * float(np.abs(want).max())
        err = float(np.abs(got - want).max())
        greedy = [int(i) for i in got.argmax(-1)[:-1]] == ids[len(PROMPT):]
        # greedy generation as `run` does it: the tokens picked on the GPU, steps overlapped (runtime/cuda_graph.py)
        eng.reset()
        gen = list(eng.generate_ids(ids[:len(PROMPT)], len(ids) - len(PROMPT), stop_token_ids=set()))
        # sampled, as `run --temperature ...` does: drawn on the GPU, steps overlapped
        drawn = list(eng.generate_ids(ids[:len(PROMPT)], STEPS, params, stop_token_ids=set()))
        eng.reset()
        expect, _ = _reference_draws(eng, ids[:len(PROMPT)], drawn, params)
        rows.append({"case": name, "max_abs_err": err, "tolerance": tol, "ok": err <= tol, "greedy_equal": greedy,
                     "overlapped": eng.overlap, "overlapped_greedy_equal": gen == ids[len(PROMPT):],
                     "overlapped_sampling": eng.overlap_sampling, "sampled_equal_reference": drawn == expect,
                     "vocab": eng.vocab,
                     "decode_step_graph": dict(eng.graph.counts) if eng.graph is not None else None})
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "families_gpu.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows,
                                                       "command": " ".join(sys.argv)}, indent=1))
    return 0 if all(r["ok"] and r["greedy_equal"] and r["overlapped_greedy_equal"] and r["sampled_equal_reference"]
                    for r in rows) else 1


def cmd_collect(args) -> int:
    report = json.loads(Path(args.file).read_text())
    report["built_by"] = "benchmarks/families_gpu.py build (tiny random models of tests/tiny_models.py)"
    report["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    for row in report["rows"]:  # how the artifact that ran replays decode (its manifest, here)
        manifest = json.loads((DIR / row["case"] / "art" / "manifest.json").read_text())
        row["cuda_graph_mode"] = manifest["cuda_graph"].get("mode")
    (REPO / "benchmarks" / "results" / "families_gpu.json").write_text(json.dumps(report, indent=1))
    print("wrote benchmarks/results/families_gpu.json")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build").set_defaults(func=cmd_build)
    d = sub.add_parser("device")
    d.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    d.set_defaults(func=cmd_device)
    c = sub.add_parser("collect")
    c.add_argument("file")
    c.set_defaults(func=cmd_collect)
    args = p.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
