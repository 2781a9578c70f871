"""One ordered pass over a data set (``make_ordered_loader``, for tokenizing it once): a finite iterator of

    images  float32 (B, 3, S, S) in [-1, 1] on the requested device
    labels  int64   (B,) on the requested device
    indices int64   (B,) on the CPU: the data-set index of every row

over this rank's contiguous block ``[r*N//W, (r+1)*N//W)`` of the data set, every index exactly once, in
increasing order; the ADM centre crop with no random augmentation (``flip=True`` mirrors every image); batches
are the next B decodable images (corrupt ones are skipped, counted in ``skipped`` and listed in ``corrupt``)
and the last batch holds what is left. The same backends decode it, so the DALI pass differs from the torch
(PIL) pass by resampling only.
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch

from .loaders import _Reader, open_checked
from .sharding import OrderedSharding, shard_bounds
from .sources import Source
from .transforms import OrderedDecoder

__all__ = ["OrderedLoader", "make_ordered_loader"]


class OrderedLoader(_Reader):
    """One pass over this rank's block of the data set, in order (see the module docstring and
    ``make_ordered_loader``). Iterating again starts a fresh pass. After a pass, ``skipped`` is the number of
    undecodable images and ``corrupt`` their data-set indices (increasing); during a pass they may already
    count images of batches not yet handed out."""

    def __init__(self, source, image_size, batch_size, rank, world_size, backend, flip, device, num_workers):
        self.flip = bool(flip)
        super().__init__(source, image_size, batch_size, rank, world_size, backend, device, num_workers,
                         OrderedDecoder(source, int(image_size), self.flip))
        lo, hi = shard_bounds(self.num_samples, self.rank, self.world_size)
        self.indices = np.arange(lo, hi, dtype=np.int64)
        self.skipped, self.corrupt = 0, []
        if backend == "memory":        # images already S x S: the centre crop is the identity (then mirrored)
            S = self.image_size
            self._identity, self._flip_all = source.images.shape[1:3] == (S, S), self.flip

    def __len__(self) -> int:
        """Batches of a pass with no corrupt image (each corrupt one may remove a batch from the end)."""
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self):
        self.skipped, self.corrupt = 0, []
        return self._batches()

    def _batches(self):
        B = self.batch_size
        if not len(self.indices):
            return
        imgs, idxs, have = [], [], 0          # decodable images not yet handed out, in order

        def emit(k):
            nonlocal imgs, idxs, have
            x = imgs[0] if len(imgs) == 1 else torch.cat(imgs)
            i = idxs[0] if len(idxs) == 1 else np.concatenate(idxs)
            imgs, idxs, have = ([x[k:]], [i[k:]], have - k) if len(i) > k else ([], [], 0)
            x, i = x[:k], i[:k]
            return (*self._to_device(x, i), torch.from_numpy(np.ascontiguousarray(i)))

        for images, metas in self._read(OrderedSharding(self.indices), 0, 0):
            good = np.fromiter((i for _, _, i, r in metas if r >= 0), np.int64)
            bad = [i for _, _, i, r in metas if r < 0]
            if bad:
                self.skipped += len(bad)
                self.corrupt.extend(bad)
            if len(good):
                if images is None or len(images) != len(good):
                    raise RuntimeError(f"internal error: a chunk of {len(good)} decodable samples holds "
                                       f"{0 if images is None else len(images)} images")
                imgs.append(images)
                idxs.append(good)
                have += len(good)
            while have >= B:
                yield emit(B)
        if have:
            yield emit(have)                   # the last, partial batch


def make_ordered_loader(source: Source, image_size: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                        loader: str = "auto", flip: bool = False, device: Union[str, torch.device] = "cpu",
                        num_workers: int = 2) -> OrderedLoader:
    """One ordered pass: an iterable of (images float32 (B,3,S,S) in [-1,1] on ``device``, labels int64 (B,) on
    ``device``, data-set indices int64 (B,) on the CPU) over rank ``rank``'s contiguous block
    (``shard_bounds``) of the data set, every index once and in increasing order.

    ADM centre crop to ``image_size`` with no random augmentation; ``flip=True`` mirrors every image. A batch
    is the next ``batch_size`` decodable images; the last batch holds the rest. Undecodable images are
    skipped: ``loader.skipped`` counts them and ``loader.corrupt`` lists their indices once the pass is done.
    ``loader``: "auto" (the memory loader for arrays, DALI if importable, else torch), "dali" (decodes on
    the GPU, "mixed", when ``device`` is CUDA, else on the CPU), "torch" (PIL, the reference recipe) or
    "memory". ``num_workers``: DataLoader workers (torch) or DALI threads."""
    src, loader = open_checked(source, image_size, batch_size, rank, world_size, num_workers, loader)
    return OrderedLoader(src, int(image_size), int(batch_size), int(rank), int(world_size), loader, flip, device,
                         0 if loader == "memory" else int(num_workers))

