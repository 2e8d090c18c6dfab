"""Quality table on the shared SmolLM2-135M-Instruct: FP16 / RTN-INT4 / AWQ-INT4 / RTN-INT3 / AWQ-INT3.

Protocol (../shared/README.md): WikiText-2 test, 40 windows of 512 tokens, PPL in float32; group
size 64 (the model's Q4_1 origin makes g32 INT4 trivially exact); AWQ calibration 16 x 512 tokens of
calib_mix_v1.jsonl in file order. Each quantized row goes through the real checkpoint: quantize ->
write the AutoAWQ GEMM checkpoint -> `load_awq_model` -> evaluate, all in one process.

    .venv/bin/python benchmarks/quality_smollm2.py            # all rows, ~1 h on a busy 2-core CPU
    .venv/bin/python benchmarks/quality_smollm2.py --rows fp16,awq4 --windows 4   # quick look

Writes benchmarks/results/quality_smollm2.json (rewritten after every row, so a cut-off run keeps
what it finished).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ROWS = {  # name -> (method, bits); None = the FP16 model itself. Cheap rows first.
    "fp16": None,
    "rtn4": ("rtn", 4),
    "rtn3": ("rtn", 3),
    "awq4": ("awq", 4),
    "awq3": ("awq", 3),
}
TABLE_ORDER = ("fp16", "rtn4", "awq4", "rtn3", "awq3")
LABELS = {"fp16": "FP16", "rtn4": "RTN-INT4", "awq4": "AWQ-INT4", "rtn3": "RTN-INT3", "awq3": "AWQ-INT3"}
# Published / reference figures for the same model and settings (g64, 40 x 512; not our measurements).
PUBLISHED = {
    "fp16": {"ppl": 28.74, "source": "../shared/README.md reference FP16 figure"},
    "awq4": {"ppl": 34.49, "source": "AutoAWQ 0.2.9, same model, g64, 16 x 512 calibration in file order"},
}
# Goals: AWQ's PPL increase over FP16 as a fraction of RTN's increase.
GOALS = {4: 0.60, 3: 0.50}


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def source_digest() -> str:
    """sha256 of the quantizer sources: the commit may not hold uncommitted work a row ran with."""
    import hashlib

    h = hashlib.sha256()
    for rel in ("awq_edge/quantizer.py", "awq_edge/adapters.py", "awq_edge/checkpoint.py", "awq_edge/evaluate.py"):
        f = REPO / rel
        h.update(f.read_bytes() if f.is_file() else b"")
    return h.hexdigest()[:16]


def device_info(device: str) -> dict:
    import torch

    info = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def summarize(rows: dict) -> dict:
    out = {}
    fp = rows.get("fp16", {}).get("ppl")
    for bits in (4, 3):
        rtn, awq = rows.get(f"rtn{bits}", {}).get("ppl"), rows.get(f"awq{bits}", {}).get("ppl")
        if fp is None or rtn is None or awq is None:
            continue
        frac = (awq - fp) / (rtn - fp) if rtn > fp else float("nan")
        out[f"int{bits}"] = {"rtn_increase": rtn - fp, "awq_increase": awq - fp, "awq_over_rtn_increase": frac,
                             "goal_max_fraction": GOALS[bits], "goal_met": bool(frac <= GOALS[bits])}
    if "awq4" in rows and "ppl" in rows["awq4"]:
        out["int4_vs_autoawq_0.2.9"] = {"ours": rows["awq4"]["ppl"], "autoawq": PUBLISHED["awq4"]["ppl"],
                                        "at_least_as_good": bool(rows["awq4"]["ppl"] <= PUBLISHED["awq4"]["ppl"])}
    return out


def print_table(rows: dict, summary: dict) -> None:
    print(f"\n{'row':10s} {'PPL':>9s} {'published':>10s} {'quant s':>8s} {'eval s':>7s}")
    for name in TABLE_ORDER:
        if name not in rows:
            continue
        r = rows[name]
        pub = PUBLISHED.get(name, {}).get("ppl")
        print(f"{LABELS[name]:10s} {r['ppl']:9.3f} {pub if pub is not None else '':>10} "
              f"{r.get('quantize_seconds', 0):8.1f} {r['eval_seconds']:7.1f}")
    for key, s in summary.items():
        if key.startswith("int") and "awq_over_rtn_increase" in s:
            print(f"{key.upper()}: AWQ increase {s['awq_increase']:.3f} = {100 * s['awq_over_rtn_increase']:.1f}% of RTN's "
                  f"{s['rtn_increase']:.3f} (goal <= {100 * s['goal_max_fraction']:.0f}%): {'met' if s['goal_met'] else 'NOT met'}")
    if "int4_vs_autoawq_0.2.9" in summary:
        s = summary["int4_vs_autoawq_0.2.9"]
        print(f"AWQ-INT4 ours {s['ours']:.3f} vs AutoAWQ 0.2.9 {s['autoawq']:.2f}: "
              f"{'at least as good' if s['at_least_as_good'] else 'worse'}")


def combine(files: list[str], out_path: Path) -> int:
    parts = [json.loads(Path(f).read_text()) for f in files]
    settings = parts[0]["settings"]
    for f, part in zip(files, parts):
        if part["settings"] != settings:
            sys.exit(f"--combine: {f} was made with other settings {part['settings']}")
    record = dict(parts[0])
    record["command"] = [part["command"] for part in parts]
    record["commit"] = sorted({part["commit"] for part in parts})
    record["rows"] = {}
    for part in parts:
        for name, row in part["rows"].items():
            record["rows"][name] = {**row, "command": part["command"], "commit": part["commit"]}
    record["combined_from"] = [str(Path(f).name) for f in files]
    record["summary"] = summarize(record["rows"])
    out_path.write_text(json.dumps(record, indent=2) + "\n")
    print_table(record["rows"], record["summary"])
    print(f"wrote {out_path}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--device", default="cpu", help="where quantization runs (eval runs there too; float32 on CPU)")
    p.add_argument("--no-duo-scaling", dest="duo_scaling", action="store_false",
                   help="llm-awq's s = mean|x|^a instead of AutoAWQ's s = mean|x|^a / mean|w|^(1-a)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quality_smollm2.json"))
    p.add_argument("--merge", action="store_true", help="keep the other rows already in --out (re-run only --rows)")
    p.add_argument("--combine", nargs="+", metavar="JSON", help="only merge result files of runs made with the "
                   "same settings (rows run as separate processes) into --out and print the table")
    args = p.parse_args(argv)
    if args.combine:
        return combine(args.combine, Path(args.out))
    rows_wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows_wanted if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {list(ROWS)}")

    import torch

    from awq_edge.adapters import get_adapter
    from awq_edge.calib import load_calibration
    from awq_edge.checkpoint import load_awq_model, save_awq_checkpoint
    from awq_edge.commands import default_calib
    from awq_edge.evaluate import default_eval_file, eval_tokens, perplexity
    from awq_edge.model_io import load_model
    from awq_edge.quantizer import QuantConfig, quantize_model
    from awq_edge.reference import ensure_reference_fp16

    fp16_dir = ensure_reference_fp16()
    eval_dtype = torch.float16 if args.device == "cuda" else torch.float32
    record = {
        "benchmark": "quality_smollm2",
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]) if argv is None else "main(" + repr(argv) + ")",
        "commit": git_commit(),
        "device": device_info(args.device),
        "model": str(fp16_dir.relative_to(REPO)) if fp16_dir.is_relative_to(REPO) else str(fp16_dir),
        "settings": {"duo_scaling": args.duo_scaling, "group_size": args.group_size, "seqlen": args.seqlen, "windows": args.windows,
                     "calib": str(default_calib()), "calib_samples": args.calib_samples,
                     "calib_seqlen": args.calib_seqlen, "calib_order": "file order", "eval_dtype": str(eval_dtype)},
        "published": PUBLISHED,
        "rows": {},
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if args.merge and out_path.is_file():
        old = json.loads(out_path.read_text())
        if old.get("settings") != record["settings"]:
            p.error(f"--merge: {out_path} was made with other settings {old.get('settings')}")
        record["rows"] = {k: v for k, v in old.get("rows", {}).items() if k not in rows_wanted}
        record["earlier_commands"] = old.get("earlier_commands", []) + [old.get("command")]

    def save():
        record["summary"] = summarize(record["rows"])
        out_path.write_text(json.dumps(record, indent=2) + "\n")

    _, tokenizer, config = load_model(fp16_dir, dtype=torch.float16)
    adapter = get_adapter(config)
    tokens = eval_tokens(tokenizer, default_eval_file())
    calib_ids = None
    if any(ROWS[r] and ROWS[r][0] == "awq" for r in rows_wanted):
        calib_ids = load_calibration(default_calib(), tokenizer, args.calib_samples, args.calib_seqlen)

    for name in rows_wanted:
        print(f"== {LABELS[name]}", flush=True)
        row: dict = {}
        with tempfile.TemporaryDirectory(prefix="quality-", dir=REPO / ".cache") as tmp:
            if ROWS[name] is None:
                model, _, _ = load_model(fp16_dir, dtype=eval_dtype, device=args.device, tokenizer=tokenizer)
            else:
                method, bits = ROWS[name]
                model, _, _ = load_model(fp16_dir, dtype=torch.float16, tokenizer=tokenizer)
                cfg = QuantConfig(w_bit=bits, group_size=args.group_size, method=method, duo_scaling=args.duo_scaling)
                t = time.perf_counter()
                qlinears = quantize_model(model, adapter, calib_ids if method == "awq" else None, cfg,
                                          device=args.device, progress=True)
                row["quantize_seconds"] = round(time.perf_counter() - t, 1)
                save_awq_checkpoint(model, qlinears, cfg, adapter, Path(tmp) / "ck", src_dir=fp16_dir, tokenizer=tokenizer)
                del model, qlinears
                model = load_awq_model(Path(tmp) / "ck", device=args.device, dtype=eval_dtype)
            t = time.perf_counter()
            row.update(perplexity(model, tokens, seqlen=args.seqlen, windows=args.windows, device=args.device))
            row["eval_seconds"] = round(time.perf_counter() - t, 1)
            row["source_digest"] = source_digest()
            row["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            del model
        record["rows"][name] = row
        print(f"{LABELS[name]}: PPL {row['ppl']:.3f}", flush=True)
        save()
    print_table(record["rows"], record.get("summary", {}))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
