"""Per-sample augmentation and decoding, from (seed, epoch, data-set index) only, so neither the worker count
nor the rank count changes it:

- "center": the ADM / LlamaGen ``center_crop_arr``: halve with BOX while the short side >= 2*S, BICUBIC
  resize so the short side is S (``round`` on both sides, as the reference does), centre crop S x S.
  ``flip=True`` adds a horizontal flip with p = 0.5.
- "random_crop_flip": LlamaGen's ``random_crop_arr`` (crop fraction in [0.8, 1.0]): short side T drawn
  uniformly from [ceil(S / 1.0), ceil(S / 0.8)], the same BOX halving while the short side >= 2*T, BICUBIC
  resize to short side T, a uniformly placed S x S crop, then a horizontal flip with p = 0.5.

The draws of a sample are ``seeding.uniforms(4, seed, "augment", epoch, idx)``. `Decoder` applies the recipe
with PIL (the reference); the DALI backend computes the same `CropPlan` on the host and resamples on its own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from dar_fast.seeding import uniforms

__all__ = ["AUGMENTS", "sample_uniforms", "CropPlan", "plan_crop", "apply_plan", "Chunk", "Decoder",
           "OrderedDecoder"]

AUGMENTS = ("center", "random_crop_flip")
_MIN_CROP_FRAC, _MAX_CROP_FRAC = 0.8, 1.0                  # LlamaGen random_crop_arr defaults


def sample_uniforms(seed: int, epoch: int, idx: int, n: int = 4) -> List[float]:
    """``n`` uniforms in [0, 1) that depend on (seed, epoch, data-set index) only (`dar_fast.seeding.uniforms`)."""
    return uniforms(n, seed, "augment", epoch, idx)


@dataclass(frozen=True)
class CropPlan:
    """Geometry of one sample: ``halvings`` BOX halvings, BICUBIC resize to ``size`` (w, h), crop at
    ``offset`` (x, y) of ``crop`` x ``crop``, then an optional horizontal flip."""
    halvings: int
    size: Tuple[int, int]
    offset: Tuple[int, int]
    crop: int
    flip: bool


def plan_crop(w: int, h: int, image_size: int, augment: str, flip: bool, u: Sequence[float]) -> CropPlan:
    """The crop of an image of ``w`` x ``h`` for uniforms ``u`` = (short side, y, x, flip), following
    ADM's ``center_crop_arr`` / LlamaGen's ``random_crop_arr`` operation for operation."""
    S = image_size
    if augment == "center":
        T = S
    else:
        lo, hi = math.ceil(S / _MAX_CROP_FRAC), math.ceil(S / _MIN_CROP_FRAC)
        T = lo + min(int(u[0] * (hi - lo + 1)), hi - lo)
    k = 0
    while min(w, h) >= 2 * T:
        w, h, k = w // 2, h // 2, k + 1
    scale = T / min(w, h)
    rw, rh = round(w * scale), round(h * scale)
    if augment == "center":
        x0, y0, do_flip = (rw - S) // 2, (rh - S) // 2, bool(flip) and u[3] < 0.5
    else:
        y0 = min(int(u[1] * (rh - S + 1)), rh - S)
        x0 = min(int(u[2] * (rw - S + 1)), rw - S)
        do_flip = u[3] < 0.5
    return CropPlan(k, (rw, rh), (x0, y0), S, do_flip)


def apply_plan(img: Image.Image, plan: CropPlan) -> np.ndarray:
    """Apply ``plan`` to an RGB PIL image -> uint8 (S, S, 3)."""
    for _ in range(plan.halvings):
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.BOX)
    img = img.resize(plan.size, resample=Image.BICUBIC)
    x0, y0 = plan.offset
    arr = np.asarray(img)[y0:y0 + plan.crop, x0:x0 + plan.crop]
    if plan.flip:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(arr)


# A chunk: (images uint8 (n_good, 3, S, S) or None, [(epoch, j, idx, row)]) with row -1 for a corrupt sample.
Chunk = Tuple[Optional[torch.Tensor], List[Tuple[int, int, int, int]]]


class Decoder:
    """Decode + augment samples of a source with PIL (the reference recipe). Picklable: it is the Dataset of
    the torch backend's DataLoader workers and the fallback of the DALI backend."""

    def __init__(self, source, image_size, augment, flip, seed):
        self.source, self.image_size, self.augment, self.flip, self.seed = source, image_size, augment, flip, seed

    def plan(self, w: int, h: int, epoch: int, idx: int) -> CropPlan:
        return plan_crop(w, h, self.image_size, self.augment, self.flip, sample_uniforms(self.seed, epoch, idx))

    def decode(self, epoch: int, idx: int) -> Optional[np.ndarray]:
        try:
            img = self.source.load(idx)
            return apply_plan(img, self.plan(img.size[0], img.size[1], epoch, idx))
        except Exception:       # any decoder failure (OSError, SyntaxError, DecompressionBombError, ...) = corrupt
            return None

    def __len__(self):
        return len(self.source)

    def __getitems__(self, keys) -> Chunk:
        arrays, metas = [], []
        for epoch, j, idx in keys:
            a = self.decode(epoch, idx)
            metas.append((epoch, j, idx, -1 if a is None else len(arrays)))
            if a is not None:
                arrays.append(a)
        images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous() if arrays else None
        return images, metas

    def __getitem__(self, key):
        return self.__getitems__([key])


class OrderedDecoder(Decoder):
    """The deterministic ADM centre crop (no random draw); ``flip`` mirrors every image."""

    def __init__(self, source, image_size, flip):
        super().__init__(source, image_size, "center", bool(flip), 0)

    def plan(self, w: int, h: int, epoch: int, idx: int) -> CropPlan:
        return plan_crop(w, h, self.image_size, "center", self.flip, (0.5, 0.5, 0.5, 0.0))
