"""`dar-fast` command line: one entry point, a subcommand per job.

Each subcommand lives beside its implementation and exposes `register(subparsers)`,
which adds its parser with `set_defaults(func=run)`.

Errors: a user's mistake (`dar_fast.errors.UsageError`, a bad option value caught
by argparse, a missing or unreadable path) is printed as one line and exits with
status 2; Ctrl-C ends quietly with status 130. Everything else is a bug or an
environment failure and keeps its traceback. `--debug` (or DAR_FAST_DEBUG=1)
prints the full traceback of a user error too.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

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

# optional packages -> the extra that installs them (a missing one is an install problem, not a bug)
_EXTRAS = {"fastapi": "serve", "uvicorn": "serve", "nvidia": "train", "lpips": "train", "flash_attn": "attn",
           "xformers": "attn", "scipy": "eval", "sklearn": "test", "httpx": "test"}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `PROG: error: argument --x: problem (see PROG --help)`, exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_common(p: argparse.ArgumentParser):
    """--threads and --debug on every subcommand that does not define its own."""
    from dar_fast.commands.common import positive_int
    if "--threads" not in p._option_string_actions:
        p.add_argument("--threads", type=positive_int, default=None,
                       help="CPU threads for torch (default: torch's choice, OMP_NUM_THREADS if set)")
    if "--debug" not in p._option_string_actions:
        p.add_argument("--debug", action="store_true", help="on an error, print the full traceback")


def build_parser() -> argparse.ArgumentParser:
    import dar_fast
    p = Parser(prog="dar-fast", description="Fast, exact D-AR sampling, evaluation and training.")
    p.add_argument("--version", action="version", version=f"dar-fast {dar_fast.__version__}")
    p.add_argument("--debug", dest="debug_all", action="store_true", help="on an error, print the full traceback")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for mod in _SUBCOMMANDS:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:      # a subcommand module not in this version/installation
            if e.name != mod:
                raise
            continue
        m.register(sub)
    for name, sp in sub.choices.items():
        _add_common(sp)
    return p


def _one_line(e: BaseException) -> str:
    # multi-line messages (a checkpoint mismatch lists its keys) still print as one line
    return "; ".join(s.strip() for s in str(e).splitlines() if s.strip()) or type(e).__name__


def user_errors():
    from dar_fast.errors import UsageError
    return (UsageError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def report_user_error(name: str, e: BaseException, debug: bool = False) -> int:
    """Print a user error as the CLI does (one line naming the problem; the traceback too with --debug) and
    return the exit status, 2. For subcommands whose ``run`` is also called directly."""
    if debug:
        import traceback
        traceback.print_exception(e)
    hint = "" if debug else " (rerun with --debug for the full traceback)"
    print(f"{name}: error: {_one_line(e)}{hint}", file=sys.stderr)
    return 2


def _one_line_warnings(name: str) -> None:
    """A command's warnings (a missing C++ sampler, a fallback to eager) as one line each, not Python's
    file:line form with a source line; --debug keeps the default form."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{name}: warning: {message}", file=file or sys.stderr)
    warnings.showwarning = show


def main(argv=None) -> int:
    debug = os.environ.get("DAR_FAST_DEBUG", "0") not in ("", "0")
    name = "dar-fast"
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:         # --help, --version, or a bad option value (one line, code 2)
            return e.code if isinstance(e.code, int) else 2
        debug = debug or args.debug_all or getattr(args, "debug", False)
        if not getattr(args, "func", None):
            parser.print_help()
            return 0
        name = f"dar-fast {args.command}"
        if not debug and argv is None:      # the console script (in-process callers keep their own handling)
            _one_line_warnings(name)
        t = getattr(args, "threads", None)
        if isinstance(t, int) and t >= 1 and not getattr(args, "threads_handled", False):
            import torch
            torch.set_num_threads(t)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        # what is written so far is complete (atomic writes); the same command resumes where it stopped
        print(f"\n{name}: interrupted", file=sys.stderr)
        return 130
    except user_errors() as e:
        return report_user_error(name, e, debug)
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top not in _EXTRAS or debug:
            raise
        print(f"{name}: error: this needs the optional package {top!r}: pip install 'dar-fast[{_EXTRAS[top]}]'",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
