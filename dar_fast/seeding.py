"""Per-sample keys: every random number a sample uses depends on (seed, sample id) only.

Tokens are drawn by `ops.sample_tokens` from a counter-based Philox stream keyed
by (seed, sample id, position). The initial pixel noise of sample (seed, id) is
drawn from the same generator keyed by (seed, sample id, element index), turned
into a normal by fixed-sequence IEEE float64 math (`dar_fast.kernels.noise`):
on the device where it is used (a Triton kernel on CUDA, the exact PyTorch
reference on CPU), the same bits alone, in any batch, on any device.

One seed-mixing rule for everything else (`key`): a 63-bit integer from the seed and the coordinates of a
draw, chained through splitmix64. Sampling uses key(seed, sample id) (`noise_seed`, the FID's random
classes); training uses key(seed, "<stream>", ...) with a named stream per use (data order, augmentation,
the trainer's step noise), so no two uses of one seed share a key.
"""
from __future__ import annotations

import functools
import hashlib
from typing import List, Sequence, Tuple, Union

import numpy as np
import torch

_M64 = (1 << 64) - 1
_M63 = (1 << 63) - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


@functools.lru_cache(maxsize=64)
def _stream_id(name: str) -> int:
    """A stream name as a 64-bit integer part (BLAKE2b of its UTF-8 bytes, little-endian)."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")


def key(*parts: Union[int, str]) -> int:
    """The project's one seed-mixing rule: integer parts (a seed, then counters such as a sample id, an epoch,
    a data-set index, a rank) and stream names -> a 63-bit integer, fit for ``torch.Generator.manual_seed``.

        h = splitmix64(p0 mod 2**64);  h = splitmix64(h ^ (p_i mod 2**64)) for each next part;  key = h mod 2**63

    A str part counts as `_stream_id(name)`. Counter-based: a key depends on its parts only (no state, no
    order of calls), so any process, worker or rank computes the same key for the same draw."""
    if not parts:
        raise TypeError("key() needs at least one part")
    h = None
    for p in parts:
        v = _stream_id(p) if isinstance(p, str) else int(p) & _M64
        h = splitmix64(v) if h is None else splitmix64(h ^ v)
    return h & _M63


def uniforms(n: int, *parts: Union[int, str]) -> List[float]:
    """``n`` floats in [0, 1) of the draw ``key(*parts)``: u_i = top 53 bits of splitmix64(key + i) / 2**53."""
    base = key(*parts)
    return [(splitmix64((base + i) & _M64) >> 11) * (1.0 / (1 << 53)) for i in range(n)]


def noise_seed(seed: int, sample_id: int) -> int:
    """63-bit generator seed for the pixel noise of key (seed, sample id): ``key(seed, sample_id)``."""
    return key(seed, sample_id)


def class_seed(seed: int, sample_id: int) -> int:
    """63-bit generator seed of the FID's random class for sample (seed, sample id): ``key(seed ^ 0x5DEECE66D,
    sample_id)``, a stream of its own beside the noise keys (the XOR keeps the values recorded before `key`
    existed; a str stream would change them)."""
    return key(seed ^ 0x5DEECE66D, sample_id)


def sample_noise(seeds: torch.Tensor, sample_ids: torch.Tensor, shape: Sequence[int], device=None) -> torch.Tensor:
    """(B,) keys -> (B, *shape) float32 standard normal noise, drawn on `device` (default: the CPU).

    Element i of sample b (row-major over `shape`) is `kernels.noise.keyed_normal`'s element i of key
    (seeds[b], sample_ids[b]); on CUDA it is drawn by the kernel, nothing is copied from the host."""
    from dar_fast.kernels.noise import keyed_normal

    shape = tuple(int(d) for d in shape)
    seeds, sample_ids = torch.as_tensor(seeds), torch.as_tensor(sample_ids)
    n = 1
    for d in shape:
        n *= d
    device = torch.device(device) if device is not None else torch.device("cpu")
    return keyed_normal(seeds, sample_ids, n, device).view(seeds.numel(), *shape)


SEED_MIN, SEED_MAX = -(1 << 63), (1 << 63) - 1     # a seed is one int64 word of the Philox key


def check_seed(seed, name: str = "seed") -> int:
    """A Python or NumPy integer (or 0-d integer tensor) in [SEED_MIN, SEED_MAX] = int64 -> int; else UsageError."""
    from dar_fast.errors import UsageError
    if torch.is_tensor(seed) and seed.dim() == 0 and not seed.dtype.is_floating_point and seed.dtype != torch.bool:
        seed = int(seed)
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise UsageError(f"{name} must be an integer, got {type(seed).__name__} {seed!r}")
    v = int(seed)
    if not SEED_MIN <= v <= SEED_MAX:
        raise UsageError(f"{name} must fit in int64 ({SEED_MIN} .. {SEED_MAX}), got {v}")
    return v


def resolve_keys(seed: Union[int, Sequence[int], torch.Tensor], batch: int,
                 sample_ids=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """seed int -> sample i uses key (seed, i); a list/array/tensor -> one seed per sample, key (seed_i, 0).

    Seeds are Python/NumPy integers within int64 (`check_seed`); floats, bools and larger values are refused.
    `sample_ids` overrides the ids (the FID generator passes global indices); they are int64 integers too.
    """
    from dar_fast.errors import UsageError
    from dar_fast.sampling_args import as_int64
    if isinstance(seed, (int, np.integer, bool, np.bool_, float)) or (torch.is_tensor(seed) and seed.dim() == 0):
        seeds = torch.full((batch,), check_seed(seed), dtype=torch.int64)
        ids = torch.arange(batch, dtype=torch.int64)
    else:
        seeds = as_int64(seed, "seed").flatten()
        if seeds.numel() != batch:
            raise UsageError(f"got {seeds.numel()} seeds for {batch} samples: give one int or one seed per sample")
        ids = torch.zeros(batch, dtype=torch.int64)
    if sample_ids is not None:
        ids = as_int64(sample_ids, "sample_ids").flatten()
        if ids.numel() != batch:
            raise UsageError(f"got {ids.numel()} sample ids for {batch} samples")
    return seeds, ids
