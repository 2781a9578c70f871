"""Shared helpers of the dar-fast benchmarks: timing, device ceilings, JSON results.

Every `benchmarks/bench_*.py` script imports this file (it sits beside them, so
`python benchmarks/bench_x.py` finds it as `_common`):

    from _common import bench, common_args, device_info, rates, write_results

Timing. On CUDA, `bench` is `triton.testing.do_bench` (L2 flushed before every
call, CUDA events, median and 20/80 % quantiles over ~`rep_ms` of runs) or, with
`cuda_graph=True`, `do_bench_cudagraph` (launch overhead removed: use it for
microsecond kernels such as one AR decode step). Without triton it falls back to
a CUDA-event loop. On CPU it is a `time.perf_counter` loop with the same
statistics.

Ceilings. `device_info` names the device and the limits achieved figures are
reported against (one flat dict): memory bandwidth `mem_bw_gbs` (GB/s) and
matrix / fp32 rates `bf16_tflops`, `fp32_tflops` (TFLOP/s).
Known GPUs come from the table below (spec sheets, plus what was measured on
this workplace's machines); an unknown GPU and the CPU get their bandwidth
measured with a large copy (bytes read + written).

Results. `write_results` writes one JSON file: {"benchmark", "meta", "results"}
where meta carries device_info (name, ceilings), torch / triton / CUDA versions, the date
(UTC, ISO 8601), the git sha and whether the tree was dirty, and the command
line. It writes through dar_fast.io.write_json_atomic, so a failed run never
leaves a half-written result.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS_DIR = os.path.join(HERE, "results")

# Per-GPU ceilings from the one device table (dar_fast.perf.DEVICES; keys matched as substrings of
# torch.cuda.get_device_name(), first match wins):
#   mem_bw_gbs            spec HBM bandwidth, GB/s (1e9 B/s)
#   mem_bw_gbs_measured   device-to-device copy measured here (read + written), GB/s
#   bf16_tflops           dense bf16 tensor-core spec, TFLOP/s
#   bf16_tflops_measured  8192^3 bf16 matmul measured on this workplace's machines
#   fp32_tflops           non-tensor-core fp32 (FMA = 2 FLOP) spec, TFLOP/s
from dar_fast.perf import gpu_ceilings  # noqa: E402

GPU_CEILINGS: list[tuple[str, dict]] = gpu_ceilings()


# ----------------------------------------------------------------------------- device

def resolve_device(name: str | None = None) -> torch.device:
    """'cuda' when available unless told otherwise."""
    if name is None or name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for but torch sees no CUDA device")
    return dev


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_copy_bandwidth(device: torch.device, nbytes: int = 256 << 20, reps: int = 5) -> float:
    """GB/s of a large tensor copy, counting bytes read plus bytes written (best of `reps`)."""
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps + 1):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 4 / best / 1e9


_INFO_CACHE: dict[str, dict] = {}


def device_info(device: torch.device | str) -> dict:
    """Device name and ceilings, one flat dict (cached per device).

    Keys: device, device_type, ceiling_source, mem_bw_gbs, and where known
    mem_bw_gbs_measured, bf16_tflops, bf16_tflops_measured, fp32_tflops,
    sm_count, memory_gib.
    """
    device = torch.device(device)
    key = str(device)
    if key in _INFO_CACHE:
        return _INFO_CACHE[key]
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(idx)
        props = torch.cuda.get_device_properties(idx)
        info = dict(device=name, device_type="cuda", sm_count=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))
        for pat, c in GPU_CEILINGS:
            if pat in name:
                info.update(c, ceiling_source=f"table ({pat})")
                break
        else:
            info.update(mem_bw_gbs=round(measure_copy_bandwidth(device), 1), ceiling_source="measured copy")
    else:
        info = dict(device=f"{_cpu_name()} ({torch.get_num_threads()} threads)", device_type=device.type,
                    mem_bw_gbs=round(measure_copy_bandwidth(device, nbytes=64 << 20), 1),
                    ceiling_source="measured memcpy (64 MiB copy_, read + written)")
    _INFO_CACHE[key] = info
    return info


# ----------------------------------------------------------------------------- timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn: Callable[[], object], device: torch.device | str, *, warmup_ms: float = 25.0,
          rep_ms: float = 100.0, cuda_graph: bool = False, max_iters: int | None = None) -> dict:
    """Time `fn()`; returns {'ms': median, 'ms_p20', 'ms_p80', 'method'} (milliseconds per call).

    `max_iters` caps the CPU loop (smoke runs under the Triton interpreter are slow).
    """
    device = torch.device(device)
    if device.type == "cuda":
        try:
            import triton.testing as tt
        except Exception:
            tt = None
        if tt is not None:
            if cuda_graph:
                q = tt.do_bench_cudagraph(fn, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])  # own side stream
                method = "triton.testing.do_bench_cudagraph"
            else:
                q = tt.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
                method = "triton.testing.do_bench"
            return dict(ms=float(q[0]), ms_p20=float(q[1]), ms_p80=float(q[2]), method=method)
        return _bench_cuda_events(fn, device, warmup_ms, rep_ms)
    return _bench_cpu(fn, warmup_ms, rep_ms, max_iters)


def _bench_cuda_events(fn, device, warmup_ms, rep_ms) -> dict:
    fn()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    est = max(time.perf_counter() - t0, 1e-6) * 1e3
    n_warm = max(1, int(warmup_ms / est))
    n_rep = max(5, int(rep_ms / est))
    for _ in range(n_warm):
        fn()
    times = []
    for _ in range(n_rep):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return _summary(times, "cuda events")


def _bench_cpu(fn, warmup_ms, rep_ms, max_iters) -> dict:
    t0 = time.perf_counter()
    fn()
    est = max(time.perf_counter() - t0, 1e-7) * 1e3
    n_warm = int(min(max(warmup_ms / est, 0), 50))
    n_rep = max(3, int(rep_ms / est))
    if max_iters is not None:
        n_warm, n_rep = min(n_warm, max_iters), min(n_rep, max_iters)
    for _ in range(n_warm):
        fn()
    times = []
    for _ in range(n_rep):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _summary(times, "time.perf_counter loop")


def _summary(times: list[float], method: str) -> dict:
    times = sorted(times)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    return dict(ms=float(statistics.median(times)), ms_p20=float(q[1]), ms_p80=float(q[7]), method=method,
                iters=len(times))


def rates(ms: float, info: dict, *, nbytes: float | None = None, flops: float | None = None,
          flop_ceiling: str = "bf16_tflops") -> dict:
    """Achieved GB/s and TFLOP/s for one call of `ms`, and their fraction of the device ceiling."""
    out: dict = {}
    ceil = info
    if nbytes is not None:
        out["bytes"] = int(nbytes)
        out["gbps"] = nbytes / (ms * 1e-3) / 1e9
        if ceil.get("mem_bw_gbs"):
            out["frac_mem_bw"] = out["gbps"] / ceil["mem_bw_gbs"]
    if flops is not None:
        out["flops"] = int(flops)
        out["tflops"] = flops / (ms * 1e-3) / 1e12
        if ceil.get(flop_ceiling):
            out["frac_" + flop_ceiling] = out["tflops"] / ceil[flop_ceiling]
    return out


# ----------------------------------------------------------------------------- metadata, JSON

def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except Exception:
        return None


def metadata(device: torch.device | str, smoke: bool = False) -> dict:
    """Everything that says where and with what a figure was measured."""
    device = torch.device(device)
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return dict(
        **device_info(device),
        torch=torch.__version__,
        triton=triton_version,
        cuda=torch.version.cuda,
        python=platform.python_version(),
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        git_sha=_git("rev-parse", "HEAD"),
        git_dirty=None if status is None else bool(status),
        triton_interpret=os.environ.get("TRITON_INTERPRET", "0") == "1",
        smoke=smoke,
        argv=sys.argv,
    )


def write_results(path: str, benchmark: str, results: list[dict], device: torch.device | str,
                  smoke: bool = False, extra: dict | None = None) -> dict:
    """Write {'benchmark', 'meta', 'results'} to `path` atomically; returns the payload."""
    from dar_fast.io import write_json_atomic

    payload = dict(benchmark=benchmark, meta=metadata(device, smoke), results=results)
    if extra:
        payload.update(extra)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json_atomic(path, payload)
    return payload


def default_out(benchmark: str, device: torch.device, smoke: bool) -> str:
    """benchmarks/results/<benchmark>-<gpu name | cpu>[-smoke].json"""
    info = device_info(device)
    tag = info["device"] if info["device_type"] == "cuda" else "cpu"
    tag = "".join(ch if ch.isalnum() else "_" for ch in tag.replace("NVIDIA ", "")).strip("_")
    return os.path.join(RESULTS_DIR, f"{benchmark}-{tag}{'-smoke' if smoke else ''}.json")


def common_args(description: str) -> argparse.ArgumentParser:
    """--smoke, --device, --out, --rep-ms: the options every benchmark takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes and few repetitions (CI; CPU runs the Triton kernels only under TRITON_INTERPRET=1)")
    p.add_argument("--device", default="auto", help="cuda | cpu | auto (default: cuda when available)")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/<bench>-<device>.json)")
    p.add_argument("--rep-ms", type=float, default=None, help="timing budget per measurement (ms)")
    return p


def print_row(rec: dict) -> None:
    """One human-readable line per result record (any keys; times in ms shown as us)."""
    bits = []
    for k, v in rec.items():
        if isinstance(v, (dict, list, tuple)):
            continue
        if isinstance(v, float):
            if k == "ms" or k.endswith("_ms"):
                bits.append(f"{k[:-2] + 'us' if k != 'ms' else 'us'}={v * 1e3:.1f}")
            elif k.startswith("frac"):
                bits.append(f"{k}={100 * v:.1f}%")
            else:
                bits.append(f"{k}={v:.4g}")
        else:
            bits.append(f"{k}={v}")
    print("  ".join(bits), flush=True)


def triton_runnable(device: torch.device) -> bool:
    """Whether the Triton kernels can run here: CUDA, or CPU under TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def time_impls(case: str, impls: dict, device: torch.device, info: dict, *, nbytes: dict | float | None = None,
               flops: float | None = None, flop_ceiling: str = "bf16_tflops", rep_ms: float = 100.0,
               cuda_graph: bool = False, max_iters: dict | None = None, extra: dict | None = None) -> list[dict]:
    """Time each of `impls` {name: fn} on one case; one record per impl, printed as it is measured.

    nbytes: bytes one call must move (a number, or {impl: number} when the
    implementations move different amounts; the figure is then that impl's own
    traffic). Records get 'speedup_vs_torch' when a 'torch' impl was timed first.
    """
    rows = []
    base = None
    for name, fn in impls.items():
        t = bench(fn, device, rep_ms=rep_ms, warmup_ms=min(25.0, rep_ms / 4), cuda_graph=cuda_graph,
                  max_iters=(max_iters or {}).get(name))
        nb = nbytes.get(name) if isinstance(nbytes, dict) else nbytes
        rec = dict(case=case, impl=name, **(extra or {}), **t)
        rec.update(rates(t["ms"], info, nbytes=nb, flops=flops, flop_ceiling=flop_ceiling))
        if name == "torch":
            base = t["ms"]
        elif base is not None:
            rec["speedup_vs_torch"] = base / t["ms"]
        rows.append(rec)
        print_row(rec)
    return rows


def kernel_context(args) -> tuple:
    """(device, ceilings, interpreted, dtype, triton runnable) from a kernel benchmark's arguments: bf16 on CUDA,
    float32 on the CPU, where the Triton kernels only run interpreted (smoke sizes)."""
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, device_info(device), device.type != "cuda", dtype, triton_runnable(device)


def finish(name: str, rows: list, device, args) -> str:
    """Write a benchmark's rows to --out (default benchmarks/results/<name>-<device>.json) and say where."""
    out = args.out or default_out(name, device, args.smoke)
    write_results(out, name, rows, device, smoke=args.smoke)
    print(f"wrote {out}")
    return out
