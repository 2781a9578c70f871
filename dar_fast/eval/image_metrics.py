"""Per-image reconstruction metrics: PSNR and SSIM of uint8 images (what `dar-fast reconstruct` reports).

    from dar_fast.eval.image_metrics import psnr, ssim, ssim_released
    p = psnr(recon, gt)            # (N,) dB, data range 255; inf where the images are identical
    s = ssim(recon, gt)            # (N,) Wang et al. 2004: Gaussian 11x11 window, sigma 1.5, data range 255
    r = ssim_released(recon, gt)   # (N,) the number the released D-AR reconstruction script prints

Images are (N, H, W, C) or (H, W, C) arrays/tensors, uint8 (or float on the same 0..255 scale);
the arithmetic is float64 on the CPU (or `device`), batch by batch.

SSIM (Wang, Bovik, Sheikh, Simoncelli 2004, and scikit-image's `structural_similarity` with
`gaussian_weights=True, use_sample_covariance=False, data_range=255`): local means, variances and
covariance from an 11x11 Gaussian window (sigma 1.5, weights summing to 1), population moments,
C1 = (0.01 L)^2, C2 = (0.03 L)^2 with L = 255 for 8-bit images; the SSIM map over the positions where
the whole window lies inside the image ("valid"), averaged over positions and channels.

What the released script does instead (showlab/D-AR tokenizer/tokenizer_image/reconstruction_vq_ddp.py):
`structural_similarity(recon / 255, gt01, data_range=2.0, channel_axis=-1)` on images scaled to [0, 1],
i.e. a 7x7 uniform window with sample (N-1) moments and a data range of 2 for data whose range is 1. The
constants C1, C2 come out 4x too large, which pulls every SSIM towards 1 (measured on the digits model:
see the README). We report the correct value as `ssim` and, so that the paper's numbers can be compared
like for like, the released formula as `ssim_released` (on the 0..255 scale its data range is 510).
Its PSNR (`peak_signal_noise_ratio(recon / 255, gt01)`) infers a data range of 1 from the float inputs in
[0, 1]: the same as ours with 255, so `psnr` needs no released twin.
"""
from __future__ import annotations

import math
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

ArrayLike = Union[np.ndarray, torch.Tensor]

# Wang et al. 2004 / skimage: sigma 1.5 truncated at 3.5 sigma -> radius int(3.5 * 1.5 + 0.5) = 5, 11 taps
GAUSS_SIGMA = 1.5
GAUSS_SIZE = 11
K1, K2 = 0.01, 0.03
RELEASED_WINDOW = 7          # skimage's default uniform window, as the released script leaves it
RELEASED_DATA_RANGE = 510.0  # the released data_range=2.0 on [0, 1] images, rescaled to 0..255


def _as_nchw(x: ArrayLike, name: str) -> torch.Tensor:
    """(N,H,W,C) / (H,W,C) array or tensor -> float64 (N,C,H,W) CPU tensor."""
    t = x.detach().cpu() if torch.is_tensor(x) else torch.from_numpy(np.ascontiguousarray(np.asarray(x)))
    if t.dim() == 3:
        t = t[None]
    if t.dim() != 4:
        raise ValueError(f"{name}: expected images (N, H, W, C) or (H, W, C), got shape {tuple(t.shape)}")
    if t.dtype == torch.bool or not (t.dtype.is_floating_point or t.dtype == torch.uint8):
        raise ValueError(f"{name}: expected uint8 or float pixel values, got {t.dtype}")
    return t.permute(0, 3, 1, 2).to(torch.float64)


def _pair(a: ArrayLike, b: ArrayLike):
    x, y = _as_nchw(a, "first images"), _as_nchw(b, "second images")
    if x.shape != y.shape:
        raise ValueError(f"image batches differ in shape: {tuple(x.shape)} vs {tuple(y.shape)} (N, C, H, W)")
    return x, y


def psnr(a: ArrayLike, b: ArrayLike, data_range: float = 255.0) -> np.ndarray:
    """(N,) float64 PSNR in dB per image pair: 10 log10(L^2 / MSE), the MSE over all pixels and channels.

    inf where the two images are identical (MSE 0)."""
    x, y = _pair(a, b)
    mse = (x - y).pow(2).flatten(1).mean(dim=1).numpy()
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(float(data_range) ** 2 / mse)


def gaussian_window(size: int = GAUSS_SIZE, sigma: float = GAUSS_SIGMA) -> torch.Tensor:
    """(size,) float64 1-D Gaussian weights summing to 1 (the 2-D window is its outer product)."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-r * r / (2.0 * sigma * sigma))
    return w / w.sum()


def _filter_valid(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(M,1,H,W) * separable window w (k,) -> (M,1,H-k+1,W-k+1), positions with the whole window inside."""
    k = w.numel()
    x = F.conv2d(x, w.view(1, 1, 1, k))
    return F.conv2d(x, w.view(1, 1, k, 1))


def _ssim_maps_mean(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, data_range: float,
                    sample_covariance: bool) -> torch.Tensor:
    N, C, H, W = x.shape
    k = w.numel()
    if H < k or W < k:
        raise ValueError(f"SSIM needs images of at least {k}x{k} (the window), got {H}x{W}")
    # one filtering pass over the five moment images: x, y, x^2, y^2, xy (float64: 255^2 sums cancel safely)
    stack = torch.stack([x, y, x * x, y * y, x * y], dim=0).reshape(5 * N * C, 1, H, W)
    m = _filter_valid(stack, w).reshape(5, N, C, H - k + 1, W - k + 1)
    mx, my, mxx, myy, mxy = m
    norm = k * k / (k * k - 1.0) if sample_covariance else 1.0   # sample covariance: uniform windows only
    vx, vy, cxy = norm * (mxx - mx * mx), norm * (myy - my * my), norm * (mxy - mx * my)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(dim=1)


def ssim(a: ArrayLike, b: ArrayLike, data_range: float = 255.0, *, gaussian: bool = True,
         window: int = GAUSS_SIZE, sigma: float = GAUSS_SIGMA, sample_covariance: bool = False,
         batch_size: int = 64) -> np.ndarray:
    """(N,) float64 mean SSIM per image pair (see the module docstring). Defaults: Wang et al. 2004.

    `gaussian=False` uses a uniform `window` x `window` box; `sample_covariance=True` the N-1 moments
    (scikit-image's default for the uniform window)."""
    if window < 2 or (gaussian and window % 2 == 0):
        raise ValueError(f"SSIM window must be an odd size >= 3 for a Gaussian, >= 2 for a box; got {window}")
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    x, y = _pair(a, b)
    w = gaussian_window(window, sigma) if gaussian else torch.full((window,), 1.0 / window, dtype=torch.float64)
    out = [_ssim_maps_mean(x[i:i + batch_size], y[i:i + batch_size], w, float(data_range), sample_covariance)
           for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0)


def ssim_released(recon: ArrayLike, gt: ArrayLike) -> np.ndarray:
    """(N,) SSIM as the released reconstruction script computes it (7x7 box, sample moments, data range 2 on
    [0, 1] images = 510 on 0..255): too close to 1; reported only to compare with the paper's numbers."""
    return ssim(recon, gt, data_range=RELEASED_DATA_RANGE, gaussian=False, window=RELEASED_WINDOW,
                sample_covariance=True)


def frechet_distance_features(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussian fits of two feature sets (N, D), (M, D), in float64.

    ||mu_a - mu_b||^2 + Tr(Sa) + Tr(Sb) - 2 Tr((Sa^1/2 Sb Sa^1/2)^1/2), with the square roots from symmetric
    eigendecompositions (negative round-off eigenvalues clipped to 0). The same value as
    `metrics.frechet_distance` (scipy's sqrtm of Sa Sb, whose eigenvalues are those of Sa^1/2 Sb Sa^1/2), but
    exact for singular covariances, which small pixel features have (a cell that is black in every digit)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two feature sets (N >= 2, D) with the same D, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    sa, sb = np.atleast_2d(sa), np.atleast_2d(sb)

    def psd_sqrt(s):
        w, v = np.linalg.eigh((s + s.T) / 2)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    r = psd_sqrt(sa)
    w = np.linalg.eigvalsh(r @ sb @ r)
    d = mu_a - mu_b
    return float(d @ d + np.trace(sa) + np.trace(sb) - 2.0 * np.sqrt(np.clip(w, 0, None)).sum())


def mean_or_inf(values: np.ndarray) -> float:
    """Mean of per-image values as a float (inf if any is inf: identical images have infinite PSNR)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()) if v.size else math.nan
