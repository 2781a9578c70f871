"""Resume checkpoints: everything a run needs to continue exactly where it stopped, written atomically.

``<out>/checkpoint.pt`` holds

    format        "dar-fast-train/1"
    kind          "tokenizer" | "ar"
    fingerprint   what must not change across a resume: the model config, the global batch, the world size,
                  the seed, ... (see ``check_fingerprint``)
    step          optimizer steps done
    model, ema    full (unsharded) state dicts, CPU tensors
    optimizer     full optimizer state, keyed by parameter name (``torch.distributed.checkpoint.state_dict``,
                  so the same file resumes a plain, DDP or FSDP2 run)
    scheduler     {"step": ...} (the learning rate is a pure function of the step)
    loader        one data-loader state per rank (position in the sample stream)
    rng           one entry per rank: python, numpy, torch CPU, CUDA and the trainer's own generator

Every rank reads the file (a shared output directory, as on one node or a cluster file system); rank 0 writes
it: temp file in the same directory, fsync, rename, so a crash never leaves a half-written checkpoint; the
temp file a kill -9 leaves behind is removed when the next run starts (``remove_stale_temps_in``).

The file holds tensors, numbers, strings and containers only: numpy arrays of the RNG states are stored as
tensors, so it loads with ``torch.load(weights_only=True)`` and never unpickles code.
"""
from __future__ import annotations

import os
import random
import re
from typing import Optional

import numpy as np
import torch

from dar_fast.errors import UsageError
from dar_fast.io import atomic_write, remove_matching, remove_stale_temps

FORMAT = "dar-fast-train/1"
CHECKPOINT_NAME = "checkpoint.pt"


# ====================================================================================== safe containers

def to_safe(obj):
    """Recursively replace numpy arrays / scalars by tensors / Python numbers (weights_only-loadable)."""
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(obj).copy()), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_safe(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_safe(v) for v in obj)
    return obj


def from_safe(obj):
    if isinstance(obj, dict):
        if "__ndarray__" in obj and set(obj) == {"__ndarray__", "dtype"}:
            return obj["__ndarray__"].numpy().astype(obj["dtype"], copy=True)
        return {k: from_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_safe(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(from_safe(v) for v in obj)
    return obj


# ====================================================================================== RNG

def rng_state(device: torch.device, generator: Optional[torch.Generator] = None) -> dict:
    """Every RNG a step may draw from; torch states as numpy uint8 arrays (plain picklable data, so ranks can
    exchange them with all_gather_object)."""
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state().numpy()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device).numpy()
    if generator is not None:
        st["generator"] = generator.get_state().numpy()
    return st


def set_rng_state(st: dict, device: torch.device, generator: Optional[torch.Generator] = None) -> None:
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = st["numpy"]
    np.random.set_state(tuple(np_state))
    torch.set_rng_state(_bytes(st["torch"]))
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(_bytes(st["cuda"]), device)
    if generator is not None and "generator" in st:
        generator.set_state(_bytes(st["generator"]))


def _bytes(a) -> torch.Tensor:
    return a.clone() if torch.is_tensor(a) else torch.from_numpy(np.ascontiguousarray(a, dtype=np.uint8))


# ====================================================================================== files

def atomic_save(obj, path: str) -> None:
    """torch.save through `dar_fast.io.atomic_write`: a dot-named temp file in the same directory, fsync, rename
    over ``path``, fsync of the directory. A kill leaves at most that temp file; `remove_stale_temps_in` removes
    it on the next start."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: torch.save(obj, f))


_OLD_TMP = re.compile(r"^.+\.tmp\d+$")        # checkpoint.pt.tmp<pid>, the temp name of earlier versions


def remove_stale_temps_in(out: str) -> int:
    """Remove temporary files of killed writes from a run directory (call before this run writes anything).
    Returns how many were removed."""
    return remove_stale_temps(out) + remove_matching(out, _OLD_TMP)


def save_checkpoint(state: dict, path: str) -> None:
    state = dict(state, format=FORMAT)
    atomic_save(to_safe(state), path)


def load_checkpoint(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"no resume checkpoint at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"{path}: not a readable dar-fast training checkpoint ({str(e).splitlines()[0]})") from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        got = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise UsageError(f"{path}: not a dar-fast training checkpoint (format {got!r}, expected {FORMAT!r})")
    return from_safe(obj)


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_fingerprint(ckpt: dict, kind: str, fingerprint: dict, path: str) -> None:
    """A resume must continue the same run: same kind, model config and data order. Raises ValueError naming
    every difference."""
    if ckpt.get("kind") != kind:
        raise UsageError(f"{path} is a {ckpt.get('kind')!r} training checkpoint; this is train-{kind}")
    old, new = _flatten(ckpt.get("fingerprint", {})), _flatten(fingerprint)
    diffs = [f"{k}: checkpoint {old.get(k, '<absent>')!r} vs now {new.get(k, '<absent>')!r}"
             for k in sorted(set(old) | set(new)) if _norm(old.get(k)) != _norm(new.get(k))]
    if diffs:
        raise UsageError(f"cannot resume from {path}: it was written for another configuration ("
                         + "; ".join(diffs[:12]) + (" ..." if len(diffs) > 12 else "")
                         + "). Use a fresh --out, or the same settings as the run that wrote it.")


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


# ====================================================================================== state dicts

def _sd_options(full: bool = True, cpu_offload: bool = True, from_rank0: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    if from_rank0:
        return StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    return StateDictOptions(full_state_dict=full, cpu_offload=cpu_offload)


def model_state_dict(module: torch.nn.Module, strategy: str) -> dict:
    """Full CPU state dict of an unwrapped / FSDP2 module (a collective under FSDP2; rank 0 gets the data)."""
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        return get_model_state_dict(module, options=_sd_options())
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def load_model_state_dict(module: torch.nn.Module, sd: dict, strategy: str) -> None:
    """Full state dict -> module. Under FSDP2 only rank 0 passes it (others {}); it is broadcast and sharded."""
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import set_model_state_dict
        set_model_state_dict(module, sd, options=_sd_options(from_rank0=True))
        return
    missing, unexpected = module.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise UsageError(f"checkpoint model state does not match: missing {missing[:8]}, unexpected {unexpected[:8]}")


def optimizer_state_dict(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Name-keyed full optimizer state (any wrapping; a collective under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(module, optimizer, options=_sd_options())


def load_optimizer_state_dict(module: torch.nn.Module, optimizer: torch.optim.Optimizer, osd: dict,
                              from_rank0: bool = False) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    set_optimizer_state_dict(module, optimizer, optim_state_dict=osd,
                             options=_sd_options(cpu_offload=False, from_rank0=from_rank0))
