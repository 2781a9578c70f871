"""ADM-style .npz files: sample batches, reference batches, and atomic writes.

Sample batch (what `dar-fast fid` writes, and what the ADM evaluator reads):
`arr_0` uint8 images (N, H, W, 3), optionally `arr_1` class labels (N,).

Reference batch: `arr_0` images like a sample batch, and/or precomputed Inception
statistics `mu` (2048,), `sigma` (2048, 2048), optionally `mu_s`, `sigma_s` (the
2023-dim spatial statistics for sFID). ADM's published reference batches
(e.g. VIRTUAL_imagenet256_labeled.npz) carry both; statistics that are present
are used as given, the images then serve precision/recall.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from dar_fast.errors import UsageError
from dar_fast.io import PathLike, atomic_write, write_json_atomic  # noqa: F401  (re-exported)


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------

def _open_npz(path: PathLike, what: str):
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file not found: {p}")
    try:
        f = np.load(p, allow_pickle=False)
    except Exception as e:
        raise UsageError(f"{p}: not a readable .npz file ({type(e).__name__}: {e})") from e
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise UsageError(f"{p}: is a single .npy array, expected an .npz archive with arr_0 (np.savez(path, images))")
    return f


def _get(f, key: str, path: PathLike) -> np.ndarray:
    try:
        return f[key]
    except Exception as e:  # object arrays (pickles), truncated members
        raise UsageError(f"{path}: cannot read '{key}' ({type(e).__name__}: {e})") from e


def _check_images(images: np.ndarray, path: PathLike) -> np.ndarray:
    if images.dtype != np.uint8:
        raise UsageError(f"{path}: arr_0 has dtype {images.dtype}; expected uint8 pixel values 0..255 "
                         f"with shape (N, H, W, 3)")
    if images.ndim != 4 or images.shape[-1] != 3:
        hint = " (looks channels-first: transpose to (N, H, W, 3))" if images.ndim == 4 and images.shape[1] == 3 else ""
        raise UsageError(f"{path}: arr_0 has shape {images.shape}; expected RGB images (N, H, W, 3){hint}")
    if images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise UsageError(f"{path}: arr_0 is empty: shape {images.shape}")
    return images


def load_samples(path: PathLike) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(images uint8 (N, H, W, 3), labels (N,) or None) from an ADM-style sample .npz.

    FileNotFoundError for a missing file, ValueError (naming the file and the
    problem) for anything else: no arr_0, dtype not uint8, shape not (N, H, W, 3),
    labels that do not match.
    """
    with _open_npz(path, "sample") as f:
        if "arr_0" not in f.files:
            raise UsageError(f"{path}: no 'arr_0' array (has: {', '.join(f.files) or 'nothing'}); expected images "
                             f"uint8 (N, H, W, 3) in arr_0, as np.savez(path, images, labels) writes")
        images = _check_images(_get(f, "arr_0", path), path)
        labels = _get(f, "arr_1", path) if "arr_1" in f.files else None
    if labels is not None and (labels.shape != (images.shape[0],) or labels.dtype.kind not in "iu"):
        raise UsageError(f"{path}: arr_1 (labels) has shape {labels.shape} dtype {labels.dtype}; "
                         f"expected integers of shape ({images.shape[0]},)")
    return images, labels


@dataclass
class Reference:
    """A reference batch: images (for features and precision/recall) and/or precomputed statistics."""

    path: str
    images: Optional[np.ndarray] = None   # (M, H, W, 3) uint8
    mu: Optional[np.ndarray] = None       # (2048,) float64
    sigma: Optional[np.ndarray] = None    # (2048, 2048)
    mu_s: Optional[np.ndarray] = None     # (2023,) spatial, for sFID
    sigma_s: Optional[np.ndarray] = None  # (2023, 2023)


def _check_stats(mu: np.ndarray, sigma: np.ndarray, names: str, path: PathLike):
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise UsageError(f"{path}: {names} have shapes {mu.shape} and {sigma.shape}; expected (D,) and (D, D)")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UsageError(f"{path}: {names} contain NaN or inf")
    return mu, sigma


def load_reference(path: PathLike) -> Reference:
    """A reference batch: images in `arr_0` and/or statistics `mu`, `sigma` (+ `mu_s`, `sigma_s`), used as given."""
    with _open_npz(path, "reference") as f:
        keys = set(f.files)
        ref = Reference(path=str(path))
        for a, b in (("mu", "sigma"), ("mu_s", "sigma_s")):
            if (a in keys) != (b in keys):
                raise UsageError(f"{path}: has '{a if a in keys else b}' without '{b if a in keys else a}'")
        if "mu" in keys:
            ref.mu, ref.sigma = _check_stats(_get(f, "mu", path), _get(f, "sigma", path), "mu/sigma", path)
        if "mu_s" in keys:
            ref.mu_s, ref.sigma_s = _check_stats(_get(f, "mu_s", path), _get(f, "sigma_s", path), "mu_s/sigma_s", path)
        if "arr_0" in keys:
            ref.images = _check_images(_get(f, "arr_0", path), path)
    if ref.images is None and ref.mu is None:
        raise UsageError(f"{path}: neither images ('arr_0') nor statistics ('mu', 'sigma'); has: "
                         f"{', '.join(sorted(keys)) or 'nothing'}")
    return ref


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------

def save_npz_atomic(path: PathLike, **arrays) -> Path:
    """np.savez(path, **arrays) through a temporary file + os.replace (the name is used as given, no '.npz' added)."""
    return atomic_write(path, lambda f: np.savez(f, **arrays))


