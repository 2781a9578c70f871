"""Writing results a person looks at: PNGs, grids, preview strips (atomically: temp file + rename)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from dar_fast.io import atomic_write


def save_png(array: np.ndarray, path: str):
    """(H,W,3) uint8 -> PNG, never leaving a half-written file."""
    from PIL import Image
    atomic_write(path, lambda f: Image.fromarray(np.ascontiguousarray(array)).save(f, format="PNG"))


def make_grid(images, nrow: int, pad: int = 2, scale: int = 1) -> np.ndarray:
    """(B,H,W,3) uint8 -> one (rows*(H+pad)+pad, nrow*(W+pad)+pad, 3) image, row-major, black padding.

    `scale` > 1 enlarges by nearest neighbour (the 32x32 digits are too small to see)."""
    imgs = images.numpy() if torch.is_tensor(images) else np.asarray(images)
    if scale > 1:
        imgs = imgs.repeat(scale, axis=1).repeat(scale, axis=2)
    B, H, W, C = imgs.shape
    rows = (B + nrow - 1) // nrow
    grid = np.zeros((rows * (H + pad) + pad, nrow * (W + pad) + pad, C), dtype=np.uint8)
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[pad + r * (H + pad):pad + r * (H + pad) + H, pad + c * (W + pad):pad + c * (W + pad) + W] = imgs[i]
    return grid


def preview_strips(previews: Sequence, pad: int = 2, scale: int = 1) -> np.ndarray:
    """previews: K tensors (B,H,W,3) uint8 -> grid with one row per image, one column per group."""
    stack = torch.stack([torch.as_tensor(p) for p in previews], dim=1)      # (B,K,H,W,3)
    B, K = stack.shape[:2]
    return make_grid(stack.reshape(B * K, *stack.shape[2:]), nrow=K, pad=pad, scale=scale)
