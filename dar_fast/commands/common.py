"""Checks and helpers shared by the sampling commands (`sample`, `fid`, `serve`).

The argparse `type=` functions below reject a bad value at parse time with one
line that names the option (argparse prefixes "argument --x:"), before anything
is loaded or written.
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Optional

from dar_fast.errors import UsageError

SEED_MAX = 2 ** 63 - 1          # seeds are int64 keys
# below this many AR + tokenizer parameters a second thread only adds OpenMP spin-waiting on small matmuls
# (digits model, 2-core machine under load: 8x slower with 2 threads than with 1)
SMALL_MODEL_PARAMS = 20_000_000


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def seed(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number in [0, 2^63-1], got {s!r}") from None
    if not 0 <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be in [0, 2^63-1] (a 64-bit key), got {v}")
    return v


def _finite(s: str, what: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {s!r}")
    return v


def temperature(s: str) -> float:
    v = _finite(s, "a number > 0")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return v


def top_p(s: str) -> float:
    v = _finite(s, "a number in (0, 1]")
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {v}")
    return v


def cfg(s: str):
    """'2.0' -> 2.0; '1.1,8' -> (1.1, 8.0), a linear schedule over the token positions."""
    parts = s.split(",")
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected a scale (e.g. 2.0) or start,end (e.g. 1.1,8.0), got {s!r}")
    vals = []
    for x in parts:
        try:
            v = float(x)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a scale (e.g. 2.0) or start,end (e.g. 1.1,8.0), got {s!r}") from None
        if not math.isfinite(v) or v < 0:
            raise argparse.ArgumentTypeError(f"scales must be finite and >= 0, got {s!r}")
        vals.append(v)
    return vals[0] if len(vals) == 1 else tuple(vals)


def device(s: str) -> str:
    import torch
    try:
        d = torch.device(s)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device: {s!r} (e.g. cpu, cuda, cuda:1)") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise argparse.ArgumentTypeError(f"{s}: CUDA is not available ({why}); use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{s}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif d.type not in ("cpu", "mps", "xpu"):
        raise argparse.ArgumentTypeError(f"unsupported device {s!r} (use cpu or cuda)")
    return s


def out_dir(s: str) -> str:
    """An output folder: must not be an existing file nor lie under one. Not created here."""
    if not s:
        raise argparse.ArgumentTypeError("empty path")
    p = os.path.abspath(s)
    if os.path.exists(p) and not os.path.isdir(p):
        raise argparse.ArgumentTypeError(f"{s} exists and is not a folder")
    parent = p
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"{s}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"{s}: {parent} is not writable")
    return s


def make_out_dir(path: str, option: str = "--out") -> bool:
    """Create the output folder (after every input was checked); True if it did not exist before."""
    existed = os.path.isdir(path)
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".dar_fast_write_test.{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{option} {path}: cannot write there ({e.strerror or e})") from None
    return not existed


def apply_threads(threads: Optional[int], num_params: int, verbose: bool = False) -> int:
    """Set torch's CPU threads: the given number, else 1 for small models, else torch's default
    (capped by the CPUs this process may use). Returns the effective count."""
    import torch
    how = "--threads" if threads is not None else "auto"
    if threads is None:
        if num_params < SMALL_MODEL_PARAMS:
            threads = 1
        else:
            try:
                cpus = len(os.sched_getaffinity(0))
            except AttributeError:
                cpus = os.cpu_count() or 1
            threads = max(1, min(torch.get_num_threads(), cpus))
    torch.set_num_threads(threads)
    n = torch.get_num_threads()
    if verbose:
        rule = "" if how == "--threads" else (f": small model, < {SMALL_MODEL_PARAMS // 10**6}M parameters"
                                              if num_params < SMALL_MODEL_PARAMS else ": torch's default")
        print(f"threads: {n} ({how}{rule})")
    return n


def as_usage_error(option: str, e: Exception) -> UsageError:
    """A loader's ValueError/OSError about a file the user named -> UsageError naming the option."""
    msg = str(e)
    return UsageError(f"{option}: {msg}")
