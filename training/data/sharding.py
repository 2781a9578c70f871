"""Which sample a rank reads when, and where it stands: the order every loader shares, and its resume state.

Order. Epoch e is ``torch.randperm(N)`` from a generator seeded by ``seeding.key(seed, e, 0)``.
The epoch uses its first ``(N // (B * world)) * B * world`` positions (drop_last; with ``drop_last=False``
the permutation is padded from its own start to a multiple of B * world, as DistributedSampler pads) and
rank r takes positions r::world of them, so ranks are disjoint. A rank reads its positions as one endless
stream across epochs of (epoch, j, data-set index), j < ``per_rank``.

The ordered pass (`OrderedSharding`) is the same protocol for one finite pass over a contiguous block.

Resume state (`StreamState`): the position just after the last sample handed out, (``epoch``, ``index``),
plus the settings that define the order; loading a state whose order settings differ is refused, since the
order would not continue.
"""
from __future__ import annotations

from typing import Iterator, List, Tuple

import numpy as np
import torch

from dar_fast.errors import UsageError
from dar_fast.seeding import key

__all__ = ["split_global_batch", "epoch_permutation", "shard_bounds", "Sharding", "OrderedSharding",
           "StreamState"]

Position = Tuple[int, int, int]       # (epoch, j, data-set index)


def split_global_batch(global_batch: int, world_size: int) -> int:
    """Per-rank batch size for ``global_batch`` over ``world_size`` ranks; a clear error if it does not divide."""
    if int(global_batch) != global_batch or global_batch <= 0:
        raise UsageError(f"global batch size must be a positive integer, got {global_batch}")
    if int(world_size) != world_size or world_size <= 0:
        raise UsageError(f"world size must be a positive integer, got {world_size}")
    if global_batch % world_size:
        raise UsageError(f"global batch size {global_batch} is not divisible by the world size {world_size} "
                         f"(each rank needs the same batch); use a multiple of {world_size}, e.g. "
                         f"{(global_batch // world_size + 1) * world_size}")
    return global_batch // world_size


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The epoch's permutation of ``range(n)`` (int64), from a torch.Generator seeded by ``key(seed, epoch, 0)``
    (the key of data-set index 0 in the epoch; a torch generator, not the augmentation's splitmix stream)."""
    g = torch.Generator()
    g.manual_seed(key(seed, epoch, 0))
    return torch.randperm(n, generator=g)


def shard_bounds(n: int, rank: int, world_size: int) -> Tuple[int, int]:
    """Rank ``rank``'s contiguous block ``[lo, hi)`` of ``n`` samples: ``lo = rank * n // world_size``."""
    return rank * n // world_size, (rank + 1) * n // world_size


class Sharding:
    """Which data-set index a rank reads at (epoch, j), j < per_rank (see the module docstring).

    ``what`` and ``hint`` name the data and the remedy in the error for a data set smaller than one global
    batch."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int, drop_last: bool = True,
                 what: str = "data set", hint: str = "lower the batch size or pass drop_last=False"):
        self.n, self.rank, self.world, self.seed = n, rank, world_size, seed
        step = batch_size * world_size
        if drop_last:
            if n < step:
                raise UsageError(f"the {what} has {n} samples, fewer than one global batch "
                                 f"({batch_size} x {world_size} ranks = {step}); {hint}")
            used = (n // step) * step
        else:
            used = -(-n // step) * step
        self.per_rank = used // world_size
        self._perm_epoch, self._perm = None, None

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm, self._perm_epoch = epoch_permutation(self.seed, epoch, self.n).numpy(), epoch
        return self._perm

    def indices(self, epoch: int) -> np.ndarray:
        """Data-set indices this rank reads in ``epoch``, in order."""
        pos = (self.rank + np.arange(self.per_rank, dtype=np.int64) * self.world) % self.n
        return self.permutation(epoch)[pos]

    def index(self, epoch: int, j: int) -> int:
        return int(self.permutation(epoch)[(self.rank + j * self.world) % self.n])

    def next_position(self, epoch: int, j: int) -> Tuple[int, int]:
        """The position after (epoch, j)."""
        return (epoch + 1, 0) if j + 1 == self.per_rank else (epoch, j + 1)

    def positions(self, epoch: int, j: int) -> Iterator[Position]:
        """Endless (epoch, j, idx) from (epoch, j) on."""
        while True:
            yield epoch, j, self.index(epoch, j)
            epoch, j = self.next_position(epoch, j)

    def chunks(self, epoch: int, j: int, size: int) -> Iterator[List[Position]]:
        """Endless lists of ``size`` consecutive (epoch, j, idx)."""
        it = self.positions(epoch, j)
        while True:
            yield [next(it) for _ in range(size)]


class OrderedSharding:
    """The (epoch, j, idx) protocol of `Sharding` for one pass over ``indices``: epoch 0 only, finite."""

    def __init__(self, indices: np.ndarray):
        self.indices = indices
        self.per_rank = len(indices)

    def index(self, epoch: int, j: int) -> int:
        return int(self.indices[j])

    def next_position(self, epoch: int, j: int) -> Tuple[int, int]:
        return (epoch + 1, 0) if j + 1 == self.per_rank else (epoch, j + 1)

    def chunks(self, epoch: int, j: int, size: int) -> Iterator[List[Position]]:
        """Lists of ``size`` consecutive (0, j, idx) from position j to the end (the last one shorter)."""
        if epoch > 0:
            return
        for a in range(j, self.per_rank, size):
            yield [(0, k, int(self.indices[k])) for k in range(a, min(a + size, self.per_rank))]


class StreamState:
    """The resume state of an endless loader: ``epoch``/``index`` (positions of this rank's epoch consumed) and
    the order-defining settings, checked on load. Mixed into every endless loader (images and codes)."""

    ORDER_KEYS: Tuple[str, ...] = ("seed", "world_size", "batch_size", "num_samples")
    what = "loader"

    def _state(self, epoch: int, index: int) -> dict:
        return {"epoch": int(epoch), "index": int(index), "rank": self.rank,
                **{k: getattr(self, k) for k in self.ORDER_KEYS}}

    def _load_position(self, sd: dict, per_rank: int) -> Tuple[int, int]:
        """(epoch, index) of ``sd`` after checking that its order settings are this loader's (another rank's
        state is accepted: with no corrupt images every rank is at the same index)."""
        for k in self.ORDER_KEYS:
            if k in sd and sd[k] != getattr(self, k):
                raise UsageError(f"{self.what} state was saved with {k}={sd[k]!r} but this loader has "
                                 f"{k}={getattr(self, k)!r}: the sample order would not continue")
        epoch, index = int(sd["epoch"]), int(sd["index"])
        if not 0 <= index < per_rank or epoch < 0:
            raise UsageError(f"{self.what} state position epoch={epoch} index={index} is out of range "
                             f"(0 <= index < {per_rank})")
        return epoch, index
