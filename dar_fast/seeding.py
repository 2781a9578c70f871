"""Per-sample keys: every random number a sample uses depends on (seed, sample id) only.

Tokens are drawn by `ops.sample_tokens` from a counter-based Philox stream keyed
by (seed, sample id, position). The initial pixel noise of sample (seed, id) is
drawn on the CPU from a generator seeded by a 64-bit mix of the key, then moved
to the device: the same noise alone, in any batch, on any device.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch

_M64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def noise_seed(seed: int, sample_id: int) -> int:
    """63-bit generator seed for the pixel noise of key (seed, sample id)."""
    return splitmix64(splitmix64(int(seed) & _M64) ^ (int(sample_id) & _M64)) & ((1 << 63) - 1)


def sample_noise(seeds: torch.Tensor, sample_ids: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """(B,) keys -> (B, *shape) float32 standard normal noise on the CPU."""
    out = torch.empty(len(seeds), *shape)
    g = torch.Generator()
    for b, (s, i) in enumerate(zip(seeds.tolist(), sample_ids.tolist())):
        g.manual_seed(noise_seed(s, i))
        out[b] = torch.randn(*shape, generator=g)
    return out


def resolve_keys(seed: Union[int, Sequence[int], torch.Tensor], batch: int,
                 sample_ids=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """seed int -> sample i uses key (seed, i); a list/tensor -> one seed per sample, key (seed_i, 0).

    `sample_ids` overrides the ids (the FID generator passes global indices).
    """
    if isinstance(seed, (int,)) or (torch.is_tensor(seed) and seed.dim() == 0):
        seeds = torch.full((batch,), int(seed), dtype=torch.int64)
        ids = torch.arange(batch, dtype=torch.int64)
    else:
        seeds = torch.as_tensor(list(seed) if not torch.is_tensor(seed) else seed, dtype=torch.int64).flatten().cpu()
        if seeds.numel() != batch:
            raise ValueError(f"got {seeds.numel()} seeds for {batch} samples: give one int or one seed per sample")
        ids = torch.zeros(batch, dtype=torch.int64)
    if sample_ids is not None:
        ids = torch.as_tensor(sample_ids, dtype=torch.int64).flatten().cpu()
        if ids.numel() != batch:
            raise ValueError(f"got {ids.numel()} sample ids for {batch} samples")
    return seeds, ids
