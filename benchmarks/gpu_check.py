"""The first GPU hour, prepared: one command that checks every GPU path of dar-fast and records every figure.

    python benchmarks/gpu_check.py --out DIR [--smoke] [--budget-s 480] [--sections a,b,...]
    bash benchmarks/gpu_check.sh [DIR]          # on a bare GPU machine: offline install, extension check, this

Sections run in a fixed order (`--list` prints them), each in its own forked process under its own time
cap, so a hang or a crashed CUDA context costs one section, never the run. DIR/gpu_check.json is rewritten
atomically after every section: per section `status` (ok | failed | skipped), `error` or `reason`,
`seconds` and its `figures`; a section that overruns its cap keeps the figures it had saved. A section is
skipped, never started, when its cap would overrun what is left of --budget-s, so the whole run is
bounded by the budget (plus the few seconds torch takes to import here). DIR/gpu_check.log holds every
section's output. The run never stops at the first failure; it exits 1 when any section failed.

--smoke runs each section's CPU variant at tiny sizes (CI: under 3 minutes on 2 cores); CUDA-only parts
say so in their figures. benchmarks/results/README.md explains how to read the JSON.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

# (name, cap on a GPU in s, cap under --smoke in s). The GPU caps add up to the default budget of 480 s. They
# are guesses (no GPU has run this yet): the sections that build the engine get the most, because every
# section is a fresh process and the captured engine compiles its steps in each (torch.compile of a 24-layer
# decode step and the DiT step: tens of seconds, less once inductor's on-disk cache is warm); pytest -m gpu
# runs ~150 tests on 4 workers. A second run can raise one with --cap NAME=SECONDS.
SECTIONS = [
    ("environment", 15, 30),
    ("pytest_gpu", 70, 60),
    ("kernels", 35, 40),
    ("engine_correctness", 75, 40),
    ("attention_kernels", 10, 20),
    ("decode_step", 30, 20),
    ("engine_end_to_end", 45, 30),
    ("tokenizer_step", 10, 20),
    ("batch_invariance", 40, 30),
    ("decode_and_fid_writer", 20, 20),
    ("training", 80, 40),
    ("benchmarks", 50, 90),
]
NAMES = [s[0] for s in SECTIONS]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def parse_sections(spec: str | None) -> list[str]:
    """'a,b' or '1,3' (1-based numbers) or None (all) -> section names in the fixed order."""
    if not spec:
        return list(NAMES)
    want = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if part.isdigit() and 1 <= int(part) <= len(NAMES):
            want.add(NAMES[int(part) - 1])
        elif part in NAMES:
            want.add(part)
        else:
            raise ValueError(f"--sections: unknown section {part!r}; known: {', '.join(NAMES)} (or 1-{len(NAMES)})")
    return [n for n in NAMES if n in want]


def _write_json(path: str, payload: dict) -> None:
    from dar_fast.io import write_json_atomic
    write_json_atomic(path, payload)


# ----------------------------------------------------------------------------- one section, in a child

def _run_child(name: str, out: str, smoke: bool, cap_s: float) -> None:
    """In the forked child: run one section, save its record, exit (0 ok, 1 failed, 3 skipped)."""
    os.setpgid(0, 0)                                  # its own group: the watchdog kills pytest / benchmarks too
    log = os.open(os.path.join(out, "gpu_check.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    code = 1
    try:
        import _gpu_sections_a as A
        import _gpu_sections_b as B
        fn = getattr(A, name, None) or getattr(B, name)
        ctx = A.Ctx(name, out, smoke, time.time() + cap_s)
        fault = dict(f.split(":", 1) for f in os.environ.get("DAR_FAST_GPU_CHECK_FAULT", "").split(",") if ":" in f)
        if name in fault:                             # tests/test_gpu_check.py: the watchdog's own test
            fn = _FAULTS[fault[name]]
        code = ctx.run(fn)
    except BaseException:                             # even the section module failing to import is a record
        traceback.print_exc()
        rec = dict(status="failed", error=traceback.format_exc().strip().splitlines()[-1], figures={})
        try:
            _write_json(os.path.join(out, "sections", f"{name}.json"), rec)
        except Exception:
            pass
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _hang(ctx):
    time.sleep(10 ** 6)


def _raise(ctx):
    ctx.put("before_the_fault", 1)
    raise RuntimeError("injected fault")


def _exit(ctx):
    os._exit(9)


_FAULTS = {"hang": _hang, "raise": _raise, "exit": _exit}


def _kill_group(pid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        time.sleep(0.5)


def run_section(name: str, out: str, smoke: bool, cap_s: float) -> dict:
    """Fork, wait at most cap_s, and return the section's record (status, seconds, figures, error/reason)."""
    rec_path = os.path.join(out, "sections", f"{name}.json")
    if os.path.exists(rec_path):
        os.remove(rec_path)
    t0 = time.time()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _run_child(name, out, smoke, cap_s)
    timed_out = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() - t0 > cap_s:
            timed_out = True
            _kill_group(pid)
            os.waitpid(pid, 0)
            break
        time.sleep(0.1)
    seconds = round(time.time() - t0, 2)
    rec = {}
    if os.path.exists(rec_path):
        try:
            rec = json.load(open(rec_path))
        except ValueError:
            rec = {}
    figures = rec.get("figures", {})
    if timed_out:
        return dict(status="failed", error=f"timed out after its cap of {cap_s:.0f}s (figures saved so far kept)",
                    seconds=seconds, figures=figures)
    code = os.waitstatus_to_exitcode(status)
    if not rec:
        return dict(status="failed", error=f"the section's process died (exit {code}) before saving a record; "
                                           "see gpu_check.log", seconds=seconds, figures=figures)
    rec["seconds"] = seconds
    if rec.get("status") == "running":             # died mid-way (a segfault, os._exit in a library, ...)
        rec.update(status="failed", error=f"the section's process died (exit {code}) before it finished "
                                          "(figures saved so far kept); see gpu_check.log")
    return rec


# ----------------------------------------------------------------------------- the run

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="directory for gpu_check.json, gpu_check.log and the benchmarks' JSON")
    p.add_argument("--smoke", action="store_true", help="CPU variants at tiny sizes (CI)")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget for all sections (default 480)")
    p.add_argument("--sections", default=None, help=f"comma-separated names or numbers (default all): {','.join(NAMES)}")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DIR/gpu_check.json")
    p.add_argument("--cap", action="append", default=[], metavar="SECTION=SECONDS",
                   help="override one section's time cap (repeatable), e.g. --cap training=150")
    p.add_argument("--list", action="store_true", help="print the sections with their caps and exit")
    args = p.parse_args(argv)
    if args.list:
        for i, (n, gpu, smoke) in enumerate(SECTIONS, 1):
            print(f"{i:2d} {n:<24} cap {gpu:4d}s on a GPU, {smoke:3d}s with --smoke")
        return 0
    try:
        names = parse_sections(args.sections)
        caps = {n: float(s if args.smoke else g) for n, g, s in SECTIONS}
        for c in args.cap:
            k, _, v = c.partition("=")
            if k not in caps or not v.replace(".", "", 1).isdigit() or float(v) <= 0:
                raise ValueError(f"--cap {c!r}: expected SECTION=SECONDS with a known section and seconds > 0")
            caps[k] = float(v)
        if not args.out:
            raise ValueError("--out DIR is required")
        if args.budget_s <= 0:
            raise ValueError(f"--budget-s must be > 0, got {args.budget_s}")
        out = os.path.abspath(args.out)
        if os.path.exists(os.path.join(out, "gpu_check.json")) and not args.overwrite:
            raise ValueError(f"{out}/gpu_check.json exists: pass another --out, or --overwrite to replace it")
    except ValueError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    os.makedirs(os.path.join(out, "sections"), exist_ok=True)
    for stale in ("gpu_check.log", "pytest_gpu.xml", "bench_sample_tokens.json", "bench_sampling.json"):
        if os.path.exists(os.path.join(out, stale)):
            os.remove(os.path.join(out, stale))
    # torch is imported once, before the first section is forked, so each section skips the ~2-6 s import.
    # The parent must never initialise CUDA (a forked child could not use it): the NVML device count keeps even
    # a stray is_available() from calling cuInit, and a check before each fork makes sure.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

    git = _git_sha()
    report = dict(tool="benchmarks/gpu_check.py", smoke=args.smoke, budget_s=args.budget_s, started=_now(),
                  finished=None, argv=sys.argv if argv is None else ["gpu_check.py", *argv], git_sha=git[0],
                  git_dirty=git[1], sections={}, summary={})
    t_start = time.time()
    json_path = os.path.join(out, "gpu_check.json")
    for name in NAMES:
        if name not in names:
            report["sections"][name] = dict(status="skipped", reason="not selected (--sections)", seconds=0.0,
                                            figures={})
            continue
        left = args.budget_s - (time.time() - t_start)
        cap = caps[name]
        _log(out, f"===== {name} (cap {cap:.0f}s, {left:.0f}s of the budget left) {_now()}")
        if cap > left:
            rec = dict(status="skipped", reason=f"would overrun the budget: its cap is {cap:.0f}s and "
                                                f"{max(left, 0):.0f}s of --budget-s {args.budget_s:.0f} are left",
                       seconds=0.0, figures={})
        else:
            import torch
            if torch.cuda.is_initialized():
                print("gpu_check: CUDA was initialised before forking a section; it may fail", file=sys.stderr)
            rec = run_section(name, out, args.smoke, cap)
        report["sections"][name] = rec
        report["summary"] = _summary(report["sections"])
        report["elapsed_s"] = round(time.time() - t_start, 2)
        _write_json(json_path, report)
        why = rec.get("error") or rec.get("reason") or ""
        line = f"[gpu_check] {name:<24} {rec['status']:<8} {rec['seconds']:7.1f}s  {why}"
        print(line, flush=True)
        _log(out, line)
    report["finished"] = _now()
    report["summary"] = _summary(report["sections"])
    report["elapsed_s"] = round(time.time() - t_start, 2)
    _write_json(json_path, report)
    # every record is in gpu_check.json now; fewer files come back from a device machine (8 at most)
    shutil.rmtree(os.path.join(out, "sections"), ignore_errors=True)
    for name, rec in report["sections"].items():     # the end of the output is what a device call returns
        body = rec.get("reason") if rec["status"] == "skipped" else json.dumps(rec.get("figures", {}), default=str)
        print(f"  {name:<22} {body[:360]}", flush=True)
    s = report["summary"]
    print(f"[gpu_check] {s['ok']} ok, {s['failed']} failed, {s['skipped']} skipped in {report['elapsed_s']:.0f}s; "
          f"wrote {json_path}", flush=True)
    return 1 if s["failed"] else 0


def _summary(sections: dict) -> dict:
    c = {"ok": 0, "failed": 0, "skipped": 0}
    for r in sections.values():
        c[r["status"]] = c.get(r["status"], 0) + 1
    return c


def _log(out: str, line: str) -> None:
    with open(os.path.join(out, "gpu_check.log"), "a") as f:
        f.write(line + "\n")


def _git_sha():
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except Exception:
            return None
    st = git("status", "--porcelain", "--untracked-files=no")
    return git("rev-parse", "HEAD"), (None if st is None else bool(st))


if __name__ == "__main__":
    sys.exit(main())
