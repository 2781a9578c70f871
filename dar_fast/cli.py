"""`dar-fast` command line: one entry point, a subcommand per job.

Each subcommand lives beside its implementation and exposes `register(subparsers)`,
which adds its parser with `set_defaults(func=run)`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

import dar_fast

# module path of every subcommand provider, in --help order
_SUBCOMMANDS = [
    "dar_fast.commands.sample",
    "dar_fast.commands.convert",
    "dar_fast.fid",
    "dar_fast.eval.cli",
    "dar_fast.reconstruct",
    "dar_fast.commands.bench",
    "dar_fast.training.cli",
    "dar_fast.serve.command",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dar-fast", description="Fast, exact D-AR sampling, evaluation and training.")
    p.add_argument("--version", action="version", version=f"dar-fast {dar_fast.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _SUBCOMMANDS:
        importlib.import_module(mod).register(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # bad input: one clear line, no traceback
        print(f"dar-fast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
