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


def preview_sheet(previews: Sequence, labels: Sequence[int], titles: Sequence[str], class_names=None,
                  max_rows: int = 10, scale: int = 1, pad: int = 4) -> np.ndarray:
    """A labelled sheet a person can read: one row per class (the first image of each, at most `max_rows`),
    one column per preview (`titles`, e.g. "group 1" ... "final"), the class name left of each row.

    previews: S tensors (B,H,W,3) uint8, the last one the final image; labels: (B,) class ids."""
    from PIL import Image, ImageDraw, ImageFont
    labels = [int(c) for c in labels]
    rows, seen = [], set()
    for i, c in enumerate(labels):                       # first sample of each class, in class order
        if c not in seen:
            seen.add(c)
            rows.append(i)
    rows = sorted(rows, key=lambda i: labels[i])[:max_rows]
    cols = [torch.as_tensor(p)[rows] for p in previews]  # S x (R,H,W,3)
    if len(titles) != len(cols):
        raise ValueError(f"{len(titles)} titles for {len(cols)} preview columns")
    R, (H, W) = len(rows), cols[0].shape[1:3]
    H, W = H * scale, W * scale
    font = ImageFont.load_default(size=max(11, min(16, H // 6)))
    left = max(int(font.getlength(_name(labels[i], class_names))) for i in rows) + 2 * pad
    top = int(font.size * 1.6)
    sheet = Image.new("RGB", (left + len(cols) * (W + pad) + pad, top + R * (H + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(titles):
        x = left + c * (W + pad)
        draw.text((x + W / 2, top / 2), title, fill=(0, 0, 0), font=font, anchor="mm")
    for r, i in enumerate(rows):
        y = top + r * (H + pad)
        draw.text((pad, y + H / 2), _name(labels[i], class_names), fill=(0, 0, 0), font=font, anchor="lm")
        for c, col in enumerate(cols):
            img = col[r].numpy()
            if scale > 1:
                img = img.repeat(scale, axis=0).repeat(scale, axis=1)
            sheet.paste(Image.fromarray(np.ascontiguousarray(img)), (left + c * (W + pad), y))
    return np.asarray(sheet)


def _name(c: int, class_names) -> str:
    return str(class_names[c]) if class_names is not None else f"class {c}"
