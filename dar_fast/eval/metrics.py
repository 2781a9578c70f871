"""FID / sFID, Inception Score and improved precision/recall, with the ADM evaluator's definitions.

Reference: openai/guided-diffusion `evaluations/evaluator.py` (the numbers D-AR
and most ImageNet papers report). Where this module departs from it, the
docstring says so and why.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Tuple, Union

import numpy as np
import torch


@contextlib.contextmanager
def full_fp32():
    """IEEE fp32 for CUDA matmuls and cuDNN convolutions inside the block, restoring the settings after.

    PyTorch lets cuDNN convolutions use TF32 by default (and other code may allow
    it for matmuls). TF32 rounds inputs to 10 mantissa bits (~5e-4 relative),
    far from the fp32 TF graph that reference statistics come from, and enough
    to flip precision/recall decisions near a radius. A no-op on CPU.
    """
    matmul, conv = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = conv


# ----------------------------------------------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------------------------------------------

def compute_statistics(features) -> Tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of `features` (N, D), in float64 (covariance with the N-1 denominator)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"compute_statistics needs features of shape (N >= 2, D), got {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64:

        ||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^{1/2})

    `(sigma1 sigma2)^{1/2}` comes from `scipy.linalg.sqrtm`. As in TTUR and the
    ADM evaluator: when the product is (near) singular and the square root is
    not finite, it is recomputed as sqrtm((sigma1 + eps I)(sigma2 + eps I)) with a
    warning; round-off can leave an imaginary part, which is dropped if the
    diagonal's imaginary parts are all within 1e-3 of zero, and is an error
    (ValueError) otherwise.
    """
    try:
        from scipy import linalg
    except ImportError as e:  # pragma: no cover - scipy is in the eval/test extras
        raise ImportError("frechet_distance needs scipy: pip install 'dar-fast[eval]' (or pip install scipy)") from e
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"mean vectors differ in shape: {mu1.shape} vs {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must be ({d}, {d}) to match the means, got {sigma1.shape} and {sigma2.shape}")

    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"frechet_distance: singular product; adding {eps} to the diagonal of both covariances")
        offset = np.eye(d) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


# ----------------------------------------------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------------------------------------------

def inception_score(logits, splits: int = 10) -> Tuple[float, float]:
    """(mean, std) over `splits` SEQUENTIAL chunks of exp(E_x KL(p(y|x) || p(y))), p = softmax(logits) in float64.

    Chunk k holds rows [k*N//splits, (k+1)*N//splits): for N = 50000 that is the
    ADM evaluator's 10 chunks of 5000 (it returns the mean only). log p(y|x)
    comes from log-softmax and log p(y) from a log-sum-exp, so probabilities that
    underflow to 0 contribute 0 rather than NaN (ADM takes log of float32 softmax).
    """
    z = np.asarray(logits)
    if z.ndim != 2:
        raise ValueError(f"inception_score expects logits of shape (N, C), got {z.shape}")
    n = z.shape[0]
    if splits < 1 or n < splits:
        raise ValueError(f"inception_score needs at least splits={splits} >= 1 samples, got N={n}")
    scores = []
    for k in range(splits):  # chunk by chunk: (chunk, C) float64 at a time, not (N, C)
        lo, hi = k * n // splits, (k + 1) * n // splits
        zk = z[lo:hi].astype(np.float64)
        log_p = zk - _logsumexp(zk, axis=1)[:, None]                 # (chunk, C) log p(y|x)
        log_py = _logsumexp(log_p, axis=0) - math.log(hi - lo)      # (C,) log of the chunk's marginal p(y)
        kl = np.sum(np.exp(log_p) * (log_p - log_py[None]), axis=1)  # (chunk,) KL(p(y|x) || p(y))
        scores.append(math.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


# ----------------------------------------------------------------------------------------------------------------
# Improved precision / recall (Kynkaanniemi et al. 2019)
# ----------------------------------------------------------------------------------------------------------------

def _as_tensor(x, device, dtype) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if t.ndim != 2:
        raise ValueError(f"features must be (N, D), got {tuple(t.shape)}")
    return t.to(device=device, dtype=dtype)


def _sq_dists(a, a_sq, b, b_sq):
    """Squared Euclidean distances (rows of a) x (rows of b) as |a|^2 - 2 a.b + |b|^2, clamped at 0."""
    return (a_sq[:, None] - 2.0 * (a @ b.t()) + b_sq[None, :]).clamp_min_(0)


def knn_radii(features: torch.Tensor, k: int = 3, batch_size: int = 10000) -> torch.Tensor:
    """Squared distance from each row to its k-th nearest other row (self excluded), (N,).

    Row blocks against column blocks with a running top-k, so memory is
    O(batch_size^2), never N x N. Self pairs are set to +inf before the top-k,
    so an exact duplicate of a point still counts as a neighbour at distance 0.
    """
    n = features.shape[0]
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} points, got {n}")
    sq = (features * features).sum(1)
    radii = torch.empty(n, dtype=features.dtype, device=features.device)
    for r0 in range(0, n, batch_size):
        rows = features[r0:r0 + batch_size]
        best = torch.full((rows.shape[0], k), math.inf, dtype=features.dtype, device=features.device)
        for c0 in range(0, n, batch_size):
            d = _sq_dists(rows, sq[r0:r0 + batch_size], features[c0:c0 + batch_size], sq[c0:c0 + batch_size])
            lo, hi = max(r0, c0), min(r0 + rows.shape[0], c0 + d.shape[1])
            if lo < hi:  # this block holds some self pairs (i, i)
                idx = torch.arange(lo, hi, device=features.device)
                d[idx - r0, idx - c0] = math.inf
            best = torch.topk(torch.cat([best, d], 1), k, dim=1, largest=False).values
        radii[r0:r0 + rows.shape[0]] = best[:, k - 1]
    return radii


def precision_recall(real_features, fake_features, k: int = 3, batch_size: int = 10000,
                     device: Union[str, torch.device, None] = None, dtype: torch.dtype = torch.float32
                     ) -> Tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019), with the ADM evaluator's definitions.

    Each point's radius is the distance to its k-th nearest neighbour within its
    own set (self excluded). precision = fraction of fake points within the
    radius of at least one real point; recall = fraction of real points within
    the radius of at least one fake point (`<=`, as ADM).

    Distances are computed blockwise (batch_size x batch_size) with torch matmul
    on `device` (default: CPU) in IEEE `dtype` (no TF32), comparing squared
    distances. In float32 the |a|^2 - 2ab + |b|^2 form has an absolute error of
    about 1e-7 (|a|^2 + |b|^2); when squared norms and squared distances are of
    the same order, as for Inception pool features, that is ~1e-6 relative
    (an estimate), so only pairs that close to a radius can flip. The ADM
    evaluator does the same expansion in float16 (falling back to float32 on
    overflow), i.e. it is coarser. dtype=torch.float64 removes the doubt at
    twice the cost on CPU (far more on GPUs with slow fp64).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    real = _as_tensor(real_features, device, dtype)
    fake = _as_tensor(fake_features, device, dtype)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dims differ: real {tuple(real.shape)} vs fake {tuple(fake.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    with full_fp32():
        r_real = knn_radii(real, k, batch_size)
        r_fake = knn_radii(fake, k, batch_size)
        real_sq, fake_sq = (real * real).sum(1), (fake * fake).sum(1)
        real_covered = torch.zeros(real.shape[0], dtype=torch.bool, device=device)  # -> recall
        fake_covered = torch.zeros(fake.shape[0], dtype=torch.bool, device=device)  # -> precision
        for r0 in range(0, real.shape[0], batch_size):
            rr = slice(r0, r0 + batch_size)
            for f0 in range(0, fake.shape[0], batch_size):
                ff = slice(f0, f0 + batch_size)
                d = _sq_dists(real[rr], real_sq[rr], fake[ff], fake_sq[ff])            # (Br, Bf)
                fake_covered[ff] |= (d <= r_real[rr][:, None]).any(0)
                real_covered[rr] |= (d <= r_fake[ff][None, :]).any(1)
    return fake_covered.double().mean().item(), real_covered.double().mean().item()
