"""`awq-edge` command line. Each subcommand lives in the module that owns the work.

A module listed here exposes `register(subparsers)`, which adds its subcommand(s) with
`set_defaults(func=...)`. Heavy imports (torch, transformers, tvm) stay inside the functions so
that `awq-edge --help` and the runtime commands start fast and need only what they use.
"""
from __future__ import annotations

import argparse
import importlib
import sys

_COMMAND_MODULES = [
    "awq_edge.commands",  # quantize, eval
    "export.cli",  # export, targets
    "runtime.cli",  # run, chat, bundle-runtime
    "awq_edge.bench_cmd",  # bench (its --hf baseline needs torch, so it lives outside runtime/)
]


def _user_errors() -> tuple[type[BaseException], ...]:
    from awq_edge.errors import UserError as A
    from export.errors import UserError as E
    from runtime.errors import UserError as R
    from tvm_kernels.errors import UserError as K

    return (A, E, R, K)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="awq-edge", description="AWQ quantization, TVM export and an on-device runtime for LLMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except _user_errors() as e:
        print(f"awq-edge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"awq-edge {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
