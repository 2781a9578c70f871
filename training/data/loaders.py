"""The endless, resumable training loaders (memory, torch, DALI) and what they share with the ordered pass:
reading a source through a backend as chunks, and the argument checks of both factories.

A chunk is (images uint8 (n_good, 3, S, S) or None, [(epoch, j, idx, row)]) with row -1 for a corrupt sample
(`transforms.Chunk`). Backends:

- "torch": ``torch.utils.data.DataLoader`` workers decode with PIL and apply the recipe exactly (the reference);
- "dali": see `dali.py`;
- "memory": arrays in this process (``ArraySource``, "digits"); no workers. Images already S x S whose plan
  is the identity are gathered whole instead of going through PIL.
"""
from __future__ import annotations

import collections
import os
from typing import Iterable, Tuple, Union

import numpy as np
import torch

from dar_fast.errors import MissingPackage, UsageError

from . import dali as _dali
from .sharding import Sharding, StreamState
from .sources import ArraySource, Source, open_source, where
from .transforms import AUGMENTS, Chunk, Decoder

__all__ = ["LOADERS", "make_loader", "MemoryLoader", "TorchLoader", "DaliLoader"]

LOADERS = ("auto", "dali", "torch", "memory")


# ====================================================================================== chunks of a backend

def _collate_chunk(chunk):
    return chunk


class _ChunkSampler:
    """batch_sampler for DataLoader: the chunks of (epoch, j, idx) of a sharding from a start position."""

    def __init__(self, shard, epoch: int, j: int, size: int):
        self.shard, self.epoch, self.j, self.size = shard, epoch, j, size

    def __iter__(self):
        return self.shard.chunks(self.epoch, self.j, self.size)


class _Reader:
    """A source read through one backend: the attributes every loader shows and ``_read(shard, epoch, j)``,
    the chunks of ``shard`` from (epoch, j) on. A subclass sets ``_identity`` (memory backend: every plan is
    the identity, so whole images are gathered) and ``_flip_all`` (mirror every gathered image)."""

    backend = "?"
    _identity, _flip_all = False, False

    def __init__(self, source, image_size, batch_size, rank, world_size, backend, device, num_workers,
                 decoder: Decoder):
        self.source, self.backend = source, backend
        self.image_size, self.batch_size = int(image_size), int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.device = torch.device(device)
        self.num_workers = int(num_workers)
        self.num_samples = len(source)
        self.classes = list(source.classes)
        self.num_classes = len(self.classes)
        self._labels = source.labels
        self._decoder = decoder
        self._chw = None
        if backend == "dali":
            _dali.check_dali(source, self.device)

    def _where(self) -> str:
        return where(self.source)

    def _to_device(self, images: torch.Tensor, idx: np.ndarray):
        """uint8 images (k,3,S,S) and their data-set indices -> (float32 images in [-1, 1], int64 labels) on the
        loader's device."""
        nb = self.device.type == "cuda"
        x = images.to(self.device, non_blocking=nb).float().div_(127.5).sub_(1.0)
        return x, torch.from_numpy(self._labels[idx]).to(self.device, non_blocking=nb)

    def _read(self, shard, epoch: int, j: int) -> Iterable[Chunk]:
        B = self.batch_size
        if self.backend == "dali":
            return _dali.dali_chunks(shard, self._decoder, B, self.num_workers, self.device,
                                     self.num_samples + shard.per_rank, self._where(), epoch, j)
        if self.backend == "memory":
            if self._identity and self._chw is None:
                self._chw = torch.from_numpy(self.source.images).permute(0, 3, 1, 2).contiguous()
            return _memory_chunks(self._decoder, shard.chunks(epoch, j, B), self._chw if self._identity else None,
                                  self._flip_all)
        # Forked workers crash while DALI pipelines run threads in this process: start them from a clean
        # forkserver then (~3 s per start instead of ~0.1 s, an estimate: the server's child imports torch afresh).
        ctx = "forkserver" if self.num_workers > 0 and len(_dali.LIVE_PIPELINES) else None
        return iter(torch.utils.data.DataLoader(
            self._decoder, batch_sampler=_ChunkSampler(shard, epoch, j, B), num_workers=self.num_workers,
            collate_fn=_collate_chunk, multiprocessing_context=ctx, pin_memory=self.device.type == "cuda",
            prefetch_factor=2 if self.num_workers > 0 else None,
            timeout=worker_timeout_s() if self.num_workers > 0 else 0))


def worker_timeout_s() -> float:
    """Seconds a decoding worker may take for one chunk before the loader raises instead of waiting forever (a
    file stuck on a hung network file system; FIFOs are already refused, `sources.read_regular_file`). 600 s is
    far above a healthy chunk's decode time; DAR_FAST_READ_TIMEOUT overrides it (0: wait forever). The torch
    DataLoader applies it only with worker processes; the in-process path and DALI's reader have no timeout."""
    return float(os.environ.get("DAR_FAST_READ_TIMEOUT", "600"))


def _memory_chunks(decoder: Decoder, chunks, chw, flip_all: bool):
    """ArraySource chunks: with ``chw`` (all images, uint8 (N,3,S,S)) the rows are gathered whole (mirrored
    when ``flip_all``), else each sample goes through PIL."""
    for keys in chunks:
        if chw is not None:
            x = chw.index_select(0, torch.tensor([k[2] for k in keys]))
            yield (x.flip(-1) if flip_all else x), [(e, j, i, r) for r, (e, j, i) in enumerate(keys)]
        else:
            yield decoder.__getitems__(keys)


# ====================================================================================== endless loaders

class _Loader(_Reader, StreamState):
    """Batch assembly, resume state and the public attributes of the endless loaders.

    A batch is the next B *decodable* samples of the rank's stream: a corrupt image is skipped, counted in
    ``skipped``, and the batch is refilled from the next positions, so batches keep their size and may
    straddle an epoch boundary."""

    ORDER_KEYS = ("seed", "world_size", "batch_size", "num_samples", "drop_last")

    def __init__(self, source, image_size, batch_size, rank, world_size, seed, augment, flip, device,
                 num_workers, drop_last):
        self.seed, self.augment, self.flip, self.drop_last = int(seed), augment, bool(flip), bool(drop_last)
        super().__init__(source, image_size, batch_size, rank, world_size, self.backend, device, num_workers,
                         Decoder(source, int(image_size), augment, bool(flip), int(seed)))
        self._shard = Sharding(self.num_samples, self.batch_size, self.rank, self.world_size, self.seed,
                               self.drop_last)
        self.steps_per_epoch = self._shard.per_rank // self.batch_size
        self.skipped = 0
        self._epoch, self._index = 0, 0
        self._pending = collections.deque()
        self._it = None

    # ---- iteration
    def __iter__(self):
        return self

    def __next__(self) -> Tuple[torch.Tensor, torch.Tensor]:
        B = self.batch_size
        if self._it is None:
            self._it = self._read(self._shard, self._epoch, self._index)
        picks, last, bad_run = [], None, 0
        bad_limit = self.num_samples + self._shard.per_rank
        while len(picks) < B:
            if not self._pending:
                images, metas = next(self._it)
                self._pending.extend((e, j, i, images, r) for e, j, i, r in metas)
            epoch, j, idx, images, row = self._pending.popleft()
            last = (epoch, j)
            if row < 0:
                self.skipped += 1
                bad_run += 1
                if bad_run > bad_limit:
                    raise RuntimeError(f"no decodable image in {bad_run} consecutive samples of {self._where()}")
                continue
            bad_run = 0
            picks.append((images, row, idx))
        self._epoch, self._index = self._shard.next_position(*last)
        first = picks[0][0]
        if all(t is first for t, _, _ in picks) and len(first) == B and [r for _, r, _ in picks] == list(range(B)):
            batch = first                                            # the common case: one whole chunk
        else:
            batch = torch.stack([t[r] for t, r, _ in picks])
        return self._to_device(batch, np.fromiter((i for _, _, i in picks), np.int64, B))

    def indices(self, epoch: int) -> np.ndarray:
        """Dataset indices this rank reads in ``epoch``, in order (corrupt ones included)."""
        return self._shard.indices(epoch)

    # ---- resume
    def state_dict(self) -> dict:
        return {**self._state(self._epoch, self._index), "skipped": self.skipped, "backend": self.backend,
                "augment": self.augment, "image_size": self.image_size}

    def load_state_dict(self, sd: dict) -> None:
        """Continue at the batch after the one ``sd`` was taken after (see `StreamState`)."""
        epoch, index = self._load_position(sd, self._shard.per_rank)
        self.close()
        self._epoch, self._index = epoch, index
        self.skipped = int(sd.get("skipped", 0))

    def close(self) -> None:
        """Stop workers / pipelines; iteration restarts from the saved position."""
        it, self._it = self._it, None
        self._pending.clear()
        if it is not None and hasattr(it, "_shutdown_workers"):        # torch DataLoader workers
            it._shutdown_workers()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        return (f"{type(self).__name__}(samples={self.num_samples}, classes={self.num_classes}, "
                f"batch={self.batch_size}, rank={self.rank}/{self.world_size}, size={self.image_size}, "
                f"augment={self.augment!r}, device={self.device})")


class MemoryLoader(_Loader):
    """In-process loader for ArraySource (no workers)."""

    backend = "memory"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        # Already S x S with a centre crop and no flip: every plan is the identity, so gather whole batches.
        S = self.image_size
        self._identity = self.augment == "center" and not self.flip and self.source.images.shape[1:3] == (S, S)


class TorchLoader(_Loader):
    """torch.utils.data.DataLoader workers decoding with PIL (the reference recipe)."""

    backend = "torch"


class DaliLoader(_Loader):
    """NVIDIA DALI decode/resize/crop/flip fed through external_source in our order (see dali.py)."""

    backend = "dali"


# ====================================================================================== factory

def open_checked(source, image_size, batch_size, rank, world_size, num_workers, loader):
    """Validate the arguments shared by both factories; open the source; resolve loader="auto"."""
    if loader not in LOADERS:
        raise UsageError(f"unknown loader {loader!r}; choose one of {', '.join(LOADERS)}")
    if int(image_size) != image_size or image_size <= 0:
        raise UsageError(f"image_size must be a positive integer, got {image_size}")
    if int(batch_size) != batch_size or batch_size <= 0:
        raise UsageError(f"batch_size (per rank) must be a positive integer, got {batch_size}")
    if int(world_size) != world_size or world_size <= 0:
        raise UsageError(f"world_size must be a positive integer, got {world_size}")
    if not 0 <= rank < world_size:
        raise UsageError(f"rank {rank} is out of range for world_size {world_size}")
    if num_workers < 0:
        raise UsageError(f"num_workers must be >= 0, got {num_workers}")
    if loader == "dali" and not _dali.dali_available():
        raise MissingPackage(_dali.DALI_HINT)
    src = open_source(source)
    if loader == "auto":
        loader = "memory" if isinstance(src, ArraySource) else ("dali" if _dali.dali_available() else "torch")
    if loader == "memory" and not isinstance(src, ArraySource):
        raise UsageError("loader='memory' takes in-memory arrays (ArraySource or 'digits'); use 'torch' or 'dali' "
                         "for files")
    return src, loader


def make_loader(source: Source, image_size: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                seed: int = 0, loader: str = "auto", augment: str = "center", flip: bool = False,
                device: Union[str, torch.device] = "cpu", num_workers: int = 2, drop_last: bool = True):
    """An endless, resumable iterator of (images float32 (B,3,S,S) in [-1,1] on ``device``, labels int64 (B,)).

    ``source``: an ImageFolder directory, webdataset .tar shard(s) (a directory of them, a path, a brace
    pattern or a list), an ``ArraySource``, or "digits" / "digits:train" / "digits:holdout".
    ``batch_size`` is per rank (see ``split_global_batch``). ``loader``: "auto" (DALI if importable, the
    memory loader for arrays, else torch), "dali", "torch" or "memory". ``augment``: "center" or
    "random_crop_flip"; ``flip`` adds random horizontal flips to "center"."""
    if augment not in AUGMENTS:
        raise UsageError(f"unknown augment {augment!r}; choose one of {', '.join(AUGMENTS)}")
    src, loader = open_checked(source, image_size, batch_size, rank, world_size, num_workers, loader)
    cls = {"memory": MemoryLoader, "torch": TorchLoader, "dali": DaliLoader}[loader]
    return cls(src, int(image_size), int(batch_size), int(rank), int(world_size), int(seed), augment, flip,
               device, int(num_workers), drop_last)
