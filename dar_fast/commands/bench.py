"""`dar-fast bench NAME [args]`: run benchmarks/bench_NAME.py (from a source checkout) with its own arguments."""
from __future__ import annotations

import glob
import os
import subprocess
import sys

from dar_fast.errors import UsageError

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")


def available():
    return sorted(os.path.basename(p)[len("bench_"):-3] for p in glob.glob(os.path.join(BENCH_DIR, "bench_*.py")))


def register(sub):
    p = sub.add_parser("bench", help="run a benchmark script by name (sampling, fid, training, a kernel, ...)")
    p.add_argument("name", help="benchmark name: " + ", ".join(available() or ["(none found)"]))
    p.add_argument("args", nargs="...", help="passed to the script (e.g. --smoke --device cpu --out x.json)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of the benchmark process (OMP_NUM_THREADS)")
    p.set_defaults(func=run, threads_handled=True)


def run(args) -> int:
    script = os.path.join(BENCH_DIR, f"bench_{args.name}.py")
    if not os.path.exists(script):
        have = ", ".join(available()) or "none (benchmarks/ ships with the source checkout, not the wheel)"
        raise UsageError(f"unknown benchmark {args.name!r}; available: {have}")
    env = dict(os.environ)
    if getattr(args, "threads", None):      # the script runs in its own process: pass the thread count on
        env["OMP_NUM_THREADS"] = str(args.threads)
    return subprocess.call([sys.executable, script, *args.args], env=env)
