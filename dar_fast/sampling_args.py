"""What a sampling call may ask for, and what it returns: argument checks, the guidance schedule, `SampleOutput`.

Shared by the public API (`Pipeline`), the engine, FID generation and the reference sampler, so that the
engine does not depend on the baseline it is checked against.
"""
from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from dar_fast.errors import UsageError
from dar_fast.models import ARModel, Tokenizer

CFG = Union[float, Tuple[float, float], Sequence[float]]


@dataclass
class SampleOutput:
    images: torch.Tensor           # (B,H,W,3) uint8
    tokens: torch.Tensor           # (B,N) int64
    noise: Optional[torch.Tensor] = None   # (B,3,H,W) initial pixel noise
    float_images: Optional[torch.Tensor] = None  # (B,3,H,W) decoder output before uint8
    settings: Optional[dict] = None        # the sampling settings used (Pipeline: given, else the model's, else defaults)


# Sampling-argument bounds. Temperature: logits are divided by it in float32. Below 1e-6 a logit gap of 1e-4
# already becomes 100 nats (odds e^-100 ~ 4e-44, under float32's smallest subnormal 1.4e-45), so the draw is an
# argmax anyway, while logits up to 3.4e32 stay finite; smaller values only risk overflow (1e-30 turns a logit of
# 1e9 into inf). CFG: the paper's schedules end at 8-11; at 1e3 a logit gap of 100 stays 1e5, far from overflow.
MIN_TEMPERATURE = 1e-6
MAX_CFG = 1e3


def _real(x, name: str) -> float:
    if isinstance(x, bool) or (torch.is_tensor(x) and (x.dim() != 0 or x.dtype == torch.bool)):
        raise UsageError(f"{name} must be a number, got {x!r}")
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be a number, got {x!r}") from None
    if not math.isfinite(v):
        raise UsageError(f"{name} must be finite, got {v}")
    return v


def _cfg_values(cfg: CFG):
    if isinstance(cfg, (int, float, np.number)) or (torch.is_tensor(cfg) and cfg.dim() == 0):
        return [_real(cfg, "cfg")], True
    try:
        vals = [_real(v, "cfg") for v in cfg]
    except TypeError:
        raise UsageError(f"cfg must be a float or a (start, end) pair, got {cfg!r}") from None
    if len(vals) != 2:
        raise UsageError(f"cfg must be a float or a (start, end) pair, got {cfg!r}")
    return vals, False


def _check_cfg(cfg: CFG):
    vals, scalar = _cfg_values(cfg)
    if min(vals) < 0 or max(vals) > MAX_CFG:
        raise UsageError(f"cfg scale{'' if scalar else 's'} must be >= 0 and <= {MAX_CFG:g}, got "
                         f"{vals[0] if scalar else vals}")
    return vals, scalar


def check_sampling_args(cfg: CFG = 1.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> None:
    """Refuse non-finite or out-of-range sampling arguments with one UsageError naming the argument."""
    _check_cfg(cfg)
    t = _real(temperature, "temperature")
    if t < MIN_TEMPERATURE:
        raise UsageError(f"temperature must be >= {MIN_TEMPERATURE:g} (smaller values overflow the logits and sample "
                         f"the same as {MIN_TEMPERATURE:g}: the most likely token), got {t}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise UsageError(f"top_k must be an integer >= 0, got {top_k!r}")
    p = _real(top_p, "top_p")
    if not 0.0 < p <= 1.0:
        raise UsageError(f"top_p must be in (0, 1], got {p}")


def cfg_schedule(cfg: CFG, num_tokens: int) -> Optional[torch.Tensor]:
    """(N,) float32 guidance scale per token position, or None for no guidance (constant 1.0).

    A float is constant; (start, end) is linspace(start, end, N)[j] for token j. Scales must be finite, in [0, MAX_CFG].
    """
    vals, scalar = _check_cfg(cfg)
    if scalar:
        return None if vals[0] == 1.0 else torch.full((num_tokens,), vals[0], dtype=torch.float32)
    return torch.linspace(vals[0], vals[1], num_tokens, dtype=torch.float32)


def check_compatible(tok: Tokenizer, ar: ARModel):
    if ar.vocab_size != tok.codebook_size:
        raise ValueError(f"AR vocabulary ({ar.vocab_size}) does not match the tokenizer codebook ({tok.codebook_size})")
    if ar.num_tokens != tok.num_tokens:
        raise ValueError(f"AR generates {ar.num_tokens} tokens but the tokenizer uses {tok.num_tokens}")


def as_int64(x, name: str) -> torch.Tensor:
    """Integers (Python/NumPy ints, integer arrays/tensors, lists of them) -> int64 CPU tensor.

    Floats are refused (they used to be truncated silently: 2.7 became class 2), and so are bools (True is not a
    class) and values outside int64."""
    if torch.is_tensor(x):
        if x.dtype == torch.bool or x.dtype.is_floating_point or x.dtype.is_complex:
            raise UsageError(f"{name} must be integers, got a {x.dtype} tensor")
        return x.detach().to("cpu", torch.int64)
    try:
        a = np.asarray(x)
    except (OverflowError, ValueError, TypeError) as e:
        raise UsageError(f"{name} must be integers ({e})") from None
    if a.dtype.kind == "b" or (a.dtype == object and any(isinstance(v, (bool, np.bool_)) for v in a.flat)):
        raise UsageError(f"{name} must be integers, got booleans")
    if a.dtype == object:       # Python ints too large for int64 (or anything else numpy could not type)
        bad = [v for v in a.flat if not isinstance(v, (int, np.integer)) or not -2 ** 63 <= int(v) < 2 ** 63]
        raise UsageError(f"{name} must be integers within int64, got {bad[:4]}")
    if a.dtype.kind not in "iu":
        raise UsageError(f"{name} must be integers, got {a.dtype} values" + (f" such as {a.flat[0].item()!r}" if a.size else ""))
    if a.dtype == np.uint64 and a.size and int(a.max()) >= 2 ** 63:
        raise UsageError(f"{name} must be within int64, got {int(a.max())}")
    return torch.from_numpy(a.astype(np.int64, copy=True))


def check_labels(ar: ARModel, labels) -> torch.Tensor:
    labels = as_int64(labels, "labels").flatten()
    try:
        ar.check_labels(labels, allow_null=False)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return labels


def check_prefix(tok: Tokenizer, prefix: Optional[torch.Tensor], batch: int) -> Optional[torch.Tensor]:
    if prefix is None:
        return None
    prefix = as_int64(prefix, "prefix_tokens")
    if prefix.dim() == 1:
        prefix = prefix[None].expand(batch, -1)
    if prefix.dim() != 2 or prefix.shape[0] != batch:
        raise UsageError(f"prefix_tokens must be (B,P) with B={batch}, got {tuple(prefix.shape)}")
    if prefix.shape[1] > tok.num_tokens:
        raise UsageError(f"prefix_tokens has {prefix.shape[1]} tokens, longer than N={tok.num_tokens}")
    if prefix.numel() and (int(prefix.min()) < 0 or int(prefix.max()) >= tok.codebook_size):
        raise UsageError(f"prefix_tokens out of the codebook [0, {tok.codebook_size})")
    return prefix
