"""Distribution through torchrun: the process group, collectives, the MFU peak and rank-0 logging.

One launcher for every scale (torchtitan's habit): ``torchrun --nproc_per_node=G -m dar_fast.cli train-ar ...``.
What is applied to the model (activation checkpointing, compile, DDP / FSDP2) is in `parallelize.py`.

Backends: NCCL on CUDA, gloo on CPU (the CPU tests run two gloo processes).
"""
from __future__ import annotations

import datetime as _dt
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

# Dense bf16 tensor-core peaks (TFLOP/s, spec sheets) for MFU come from the one device table, dar_fast.perf.DEVICES;
# override with DAR_FAST_PEAK_TFLOPS for other parts.
from dar_fast.errors import UsageError
from dar_fast import perf as _perf  # noqa: E402

PEAK_BF16_TFLOPS = [(pat, d.bf16_tflops) for pat, d in _perf.DEVICES]


# ====================================================================================== process group

@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    try:
        return int(v) if v not in (None, "") else default
    except ValueError as e:
        raise UsageError(f"environment variable {name}={v!r} is not an integer") from e


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistEnv:
    """Read the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK), pick the device and join the group.

    device: "auto" (cuda:LOCAL_RANK when CUDA is available, else cpu), "cpu", "cuda" or "cuda:N"."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
        if dev.index is None:
            dev = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    backend = None
    if world > 1:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if not dist.is_initialized():
            kw = dict(backend=backend, timeout=_dt.timedelta(seconds=timeout_s))
            if dev.type == "cuda":
                kw["device_id"] = dev
            dist.init_process_group(**kw)
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=dev, backend=backend)


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_object(obj, env: DistEnv) -> list:
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, env: DistEnv, src: int = 0):
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def agree(ok: bool, message: str, env: DistEnv) -> None:
    """Raise the same error on every rank when any rank failed a check (no rank hangs in a collective)."""
    msgs = all_gather_object(None if ok else message, env)
    bad = [m for m in msgs if m]
    if bad:
        raise UsageError(bad[0])


# ====================================================================================== tensors

def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective: every rank must call), else the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") and hasattr(t, "placements") else t


# ====================================================================================== MFU

def peak_flops(device: torch.device) -> Optional[float]:
    """Dense bf16 peak of one device in FLOP/s, or None (CPU, unknown GPU without DAR_FAST_PEAK_TFLOPS)."""
    if os.environ.get("DAR_FAST_PEAK_TFLOPS"):
        return _perf.peak_bf16_flops("")
    if device.type != "cuda":
        return None
    return _perf.peak_bf16_flops(torch.cuda.get_device_name(device))


# ====================================================================================== rank-0 output

class RankLog:
    """Messages and a progress bar on rank 0 only.

    On a terminal: a tqdm bar whose postfix carries the latest loss. Elsewhere (CI logs, files): one line per
    logged step, at most one every ``min_interval_s`` seconds, plus the first and the last."""

    def __init__(self, env: DistEnv, total: int, initial: int = 0, desc: str = "train", min_interval_s: float = 10.0,
                 quiet: bool = False):
        self.env, self.total, self.min_interval_s, self.quiet = env, total, min_interval_s, quiet
        self._last_print = 0.0
        self.bar = None
        if env.is_main and not quiet and sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True)
            except ImportError:
                self.bar = None

    def info(self, msg: str) -> None:
        if not self.env.is_main or self.quiet:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def metrics(self, rec: dict, force: bool = False) -> None:
        if not self.env.is_main or self.quiet:
            return
        terms = {k: v for k, v in rec.items() if k.startswith("loss")}
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in terms.items()}, refresh=False)
            return
        now = time.time()
        if force or now - self._last_print >= self.min_interval_s:
            self._last_print = now
            rate = rec.get("images_per_s") or rec.get("tokens_per_s")
            unit = "img/s" if "images_per_s" in rec else "tok/s"
            bits = [f"step {rec['step']}/{self.total}"] + [f"{k}={v:.4f}" for k, v in terms.items()]
            bits.append(f"lr={rec.get('lr', 0):.2e}")
            if rate:
                bits.append(f"{rate:.1f} {unit}")
            if rec.get("mfu") is not None:
                bits.append(f"mfu={100 * rec['mfu']:.1f}%")
            print("  ".join(bits), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
