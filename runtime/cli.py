"""Runtime subcommands: `run`, `chat`, `bundle-runtime` (and `bench` when run as `python -m runtime.cli`
on a board, where the awq_edge package with its `--hf` reference is absent).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_sampling_args(p: argparse.ArgumentParser, generation: bool = True) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    g.add_argument("--seed", type=int, default=None)
    if not generation:
        return
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=Path, help="artifact folder written by `awq-edge export`")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the artifact files")
    p.add_argument("--cuda-graph", default="auto", choices=["auto", "on", "off"],
                   help="replay each decode step from one CUDA graph (auto: where the artifact allows it)")


GRAPH_CHOICE = {"auto": None, "on": True, "off": False}


def sampling_from_args(args):
    from runtime.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed)


def _engine(args, **kw):
    from runtime.engine import Engine

    return Engine(args.artifact, device=args.device, verify=not args.no_verify,
                  cuda_graph=GRAPH_CHOICE[args.cuda_graph], **kw)


def cmd_run(args) -> int:
    from runtime.errors import UserError

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    sampling = sampling_from_args(args)
    prompt = args.prompt
    if prompt is None:
        prompt = sys.stdin.read()
    engine = _engine(args)
    stats: dict = {}
    for piece in engine.stream(prompt, args.max_new_tokens, sampling, args.stop, chat=args.chat, stats=stats):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        n = stats["decode_steps"]
        rate = n / stats["decode_s"] if stats["decode_s"] else float("nan")
        print(f"[prompt {stats['prompt_tokens']} tokens, ttft {stats['ttft_s'] * 1e3:.1f} ms, "
              f"{len(stats['token_ids'])} generated, decode {rate:.1f} tok/s, finish: {stats['finish_reason']}]",
              file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from runtime.chat import ChatSession, run_chat

    engine = _engine(args)
    session = ChatSession(engine, args.system, sampling_from_args(args), args.max_new_tokens, tuple(args.stop))
    return run_chat(engine, session, show_stats=args.stats)


def cmd_bundle(args) -> int:
    from runtime.bundle import make_bundle

    out = make_bundle(args.target, args.out, args.python_version, args.wheel_dir, args.with_deps)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


def bench_artifacts(args) -> list[dict]:
    """Bench the artifact and its --baseline artifacts one after the other, in this process."""
    from runtime.bench import run_bench
    from runtime.engine import Engine

    runs, sampling = [], sampling_from_args(args)  # a bad flag fails before any artifact loads
    for path, label in [(args.artifact, "artifact")] + [(b, "baseline") for b in args.baseline]:
        eng = Engine(path, device=args.device, verify=not args.no_verify, synthesize_weights=args.synthesize_weights,
                     cuda_graph=GRAPH_CHOICE[args.cuda_graph])
        runs.append(run_bench(eng, tuple(args.prompt_lengths), args.gen_tokens, label=f"{label}:{Path(path).name}",
                              sampling=sampling))
        del eng  # free its device memory before the next artifact loads
    return runs


def report_bench(runs: list[dict], args, extra: dict | None = None) -> dict:
    """Print the table and the ratios of the first run against the others; write --json."""
    from runtime.bench import format_table, ratios

    timed = [r for r in runs if r.get("results")]
    report = {**(extra or {}), "runs": runs,
              "ratios": [{"baseline": b["label"], "vs": ratios(runs[0], b)} for b in timed[1:]]}
    print(format_table(timed))
    for r in report["ratios"]:
        for row in r["vs"]:
            print(f"{runs[0]['label']} vs {r['baseline']} @ prompt {row['prompt_tokens']}: "
                  f"decode x{row['decode_speedup']:.2f}, prefill x{row['prefill_speedup']:.2f}, TTFT x{row['ttft_ratio']:.2f}")
    # an artifact exported before `argmax` / `sample` existed decodes synchronized
    kind = "sampling" if getattr(args, "temperature", 0) > 0 else "greedy"
    overlapped = {r["label"]: r[f"overlapped_{kind}"] for r in timed if f"overlapped_{kind}" in r}
    if len(set(overlapped.values())) > 1:
        print(f"note: {kind} decode is overlapped for " + ", ".join(k for k, v in overlapped.items() if v)
              + " but not for " + ", ".join(k for k, v in overlapped.items() if not v)
              + " (re-export it to compare like with like)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return report


def cmd_bench(args) -> int:
    """Runtime-only bench (no --hf): the artifact and optional baseline artifacts."""
    report_bench(bench_artifacts(args), args)
    return 0


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--baseline", type=Path, action="append", default=[], help="baseline artifact (e.g. the FP16 export)")
    p.add_argument("--prompt-lengths", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--gen-tokens", type=int, default=256)
    p.add_argument("--synthesize-weights", action="store_true", help="random weights for an artifact exported without them")
    p.add_argument("--json", type=Path, help="write the results here")
    add_sampling_args(p, generation=False)  # decode greedily (default) or sampled, seeded: same draws every run


def register(sub) -> None:
    p = sub.add_parser("run", help="generate from a prompt with an artifact, streaming to stdout")
    add_engine_args(p)
    p.add_argument("--prompt", help="prompt text (default: stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template as a user turn")
    p.add_argument("--stats", action="store_true", help="print token counts and speed to stderr")
    add_sampling_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="interactive multi-turn chat (/reset, /exit)")
    add_engine_args(p)
    p.add_argument("--system", help="system message")
    p.add_argument("--stats", action="store_true")
    add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    from runtime.bundle import PLATFORMS

    p = sub.add_parser("bundle-runtime", help="pack the runtime + TVM runtime libraries for a board into one archive")
    p.add_argument("--target", required=True, choices=sorted(PLATFORMS))
    p.add_argument("--out", required=True, type=Path, help="archive to write (.tar.gz)")
    p.add_argument("--python-version", default=None, help="the board's Python (default: per target, 3.10 for Jetson)")
    p.add_argument("--wheel-dir", type=Path, default=None, help="take the wheels from here instead of pip download")
    p.add_argument("--with-deps", action="store_true", help="also bundle numpy, tokenizers, jinja2 wheels")
    p.set_defaults(func=cmd_bundle)


def main(argv=None) -> int:
    from runtime.errors import UserError

    parser = argparse.ArgumentParser(prog="python -m runtime.cli", description="awq-edge runtime")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    register(sub)
    p = sub.add_parser("bench", help="TTFT, prefill and decode tokens/s of an artifact (runtime only)")
    add_engine_args(p)
    add_bench_args(p)
    p.set_defaults(func=cmd_bench)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
