"""PSNR / SSIM against closed forms, a brute-force window reference, and scikit-image where installed."""
import math

import numpy as np
import pytest
import torch

from dar_fast.eval.image_metrics import (
    K1,
    K2,
    frechet_distance_features,
    gaussian_window,
    psnr,
    ssim,
    ssim_released,
)

L = 255.0
C1, C2 = (K1 * L) ** 2, (K2 * L) ** 2


def _rng():
    return np.random.default_rng()      # fresh inputs every run


def _images(rng, n=3, h=23, w=29, lo=0, hi=256):
    return rng.integers(lo, hi, (n, h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------- PSNR

def test_identical_images():
    a = _images(_rng())
    assert np.all(np.isinf(psnr(a, a))) and np.all(psnr(a, a) > 0)
    np.testing.assert_allclose(ssim(a, a), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ssim_released(a, a), 1.0, rtol=0, atol=1e-12)


def test_psnr_constant_offset_is_exact():
    rng = _rng()
    d = int(rng.integers(1, 20))
    a = _images(rng, lo=20, hi=230)
    b = a + np.uint8(d)
    np.testing.assert_allclose(psnr(a, b), 20 * math.log10(255 / d), rtol=1e-12)
    np.testing.assert_allclose(psnr(b, a), psnr(a, b), rtol=0)


def test_psnr_random_sign_noise_is_exact():
    rng = _rng()
    d = int(rng.integers(1, 15))
    a = _images(rng, 2, 31, 17, lo=20, hi=230)
    n = rng.choice([-d, d], size=a.shape)
    b = (a.astype(int) + n).astype(np.uint8)                  # |n| = d everywhere: MSE = d^2 exactly
    np.testing.assert_allclose(psnr(a, b), 10 * math.log10(255 ** 2 / d ** 2), rtol=1e-12)


def test_psnr_gaussian_noise():
    rng = _rng()
    sigma = float(rng.uniform(2, 20))
    a = np.full((1, 128, 128, 3), 128.0)
    b = a + rng.normal(0, sigma, a.shape)
    # MSE of 49152 draws has relative std sqrt(2/49152) = 0.0064, i.e. 0.028 dB; 0.15 dB is > 5 std
    assert abs(psnr(a, b)[0] - 20 * math.log10(255 / sigma)) < 0.15


def test_psnr_data_range():
    rng = _rng()
    a = rng.uniform(0, 1, (2, 8, 8, 3))
    b = rng.uniform(0, 1, (2, 8, 8, 3))
    np.testing.assert_allclose(psnr(a, b, data_range=1.0), psnr(a * 255, b * 255), rtol=1e-12)


# ---------------------------------------------------------------------------------------------------- SSIM

def _ssim_brute(x, y, win2d, data_range, sample_cov=False):
    """Mean SSIM of one (H, W, C) pair by explicit windows: the definition, position by position."""
    k = win2d.shape[0]
    H, W, C = x.shape
    vals = []
    for c in range(C):
        for i in range(H - k + 1):
            for j in range(W - k + 1):
                px, py = x[i:i + k, j:j + k, c], y[i:i + k, j:j + k, c]
                mx, my = (win2d * px).sum(), (win2d * py).sum()
                vx = (win2d * (px - mx) ** 2).sum()
                vy = (win2d * (py - my) ** 2).sum()
                cxy = (win2d * (px - mx) * (py - my)).sum()
                if sample_cov:
                    f = k * k / (k * k - 1)
                    vx, vy, cxy = f * vx, f * vy, f * cxy
                c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
                vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_brute_force_windows():
    rng = _rng()
    h, w = int(rng.integers(11, 20)), int(rng.integers(11, 20))      # odd sizes welcome
    a = _images(rng, 2, h, w).astype(np.float64)
    b = np.clip(a + rng.normal(0, 30, a.shape), 0, 255)
    g = gaussian_window().numpy()
    ours = ssim(a, b)
    for i in range(2):
        assert ours[i] == pytest.approx(_ssim_brute(a[i], b[i], np.outer(g, g), 255.0), abs=1e-12)
    box = np.full((7, 7), 1 / 49)
    rel = ssim_released(a, b)
    for i in range(2):
        assert rel[i] == pytest.approx(_ssim_brute(a[i], b[i], box, 510.0, sample_cov=True), abs=1e-12)


def test_gaussian_window_is_wang_et_al():
    w = gaussian_window()
    assert w.numel() == 11 and float(w.sum()) == pytest.approx(1.0, abs=1e-15)
    r = torch.arange(11, dtype=torch.float64) - 5
    ref = torch.exp(-r ** 2 / 4.5)                # sigma 1.5: 2 sigma^2 = 4.5
    torch.testing.assert_close(w, ref / ref.sum(), rtol=0, atol=1e-15)


def test_ssim_constant_images_closed_form():
    rng = _rng()
    c1, c2 = rng.integers(0, 256, 2)
    a = np.full((1, 16, 13, 3), c1, np.uint8)
    b = np.full((1, 16, 13, 3), c2, np.uint8)
    c1, c2 = float(c1), float(c2)
    # no variance, no covariance: the contrast-structure factor is C2 / C2 = 1
    expect = (2 * c1 * c2 + C1) / (c1 * c1 + c2 * c2 + C1)
    assert ssim(a, b)[0] == pytest.approx(expect, rel=1e-12)
    c1r, c2r = (K1 * 510) ** 2, (K2 * 510) ** 2
    assert ssim_released(a, b)[0] == pytest.approx((2 * c1 * c2 + c1r) / (c1 * c1 + c2 * c2 + c1r), rel=1e-12)


def test_ssim_checkerboard_noise_closed_form():
    """y = c + d * checkerboard: every window's moments are known exactly."""
    rng = _rng()
    c, d = float(rng.integers(60, 190)), float(rng.integers(1, 50))
    H, W = int(rng.integers(14, 24)), int(rng.integers(14, 24))
    cb = (-1.0) ** np.add.outer(np.arange(H), np.arange(W))
    x = np.full((1, H, W, 3), c)
    y = c + d * np.repeat(cb[None, :, :, None], 3, axis=-1)
    g = gaussian_window().numpy()
    m1 = float((g * (-1.0) ** np.arange(11)).sum())     # the window's sum over an alternating row
    # at a window centred on a +1 cell the weighted noise mean is +d m1^2 (the window is symmetric, 11 odd);
    # on a -1 cell -d m1^2; E[noise^2] = d^2, so the variance is d^2 (1 - m1^4); x is constant: no covariance
    vals = []
    for i in range(5, H - 5):
        for j in range(5, W - 5):
            my = c + d * m1 * m1 * cb[i, j]
            vy = d * d * (1 - m1 ** 4)
            vals.append((2 * c * my + C1) / (c * c + my * my + C1) * C2 / (vy + C2))
    assert ssim(x, y)[0] == pytest.approx(np.mean(vals), rel=1e-10)


def test_ssim_properties():
    rng = _rng()
    a = _images(rng, 2, 20, 20)
    b = _images(rng, 2, 20, 20)
    s = ssim(a, b)
    np.testing.assert_allclose(s, ssim(b, a), rtol=1e-12)          # symmetric
    assert np.all(s < 0.2)                                         # independent noise images share no structure
    assert np.all(ssim(a, 255 - a) < 0)                            # inverted structure: negative covariance
    # the released data range (2x too large) pulls values towards 1
    noisy = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    assert np.all(ssim(a, noisy, data_range=510.0) > ssim(a, noisy))


def test_ssim_batches_and_single_images():
    rng = _rng()
    a, b = _images(rng, 5, 12, 15), _images(rng, 5, 12, 15)
    full = ssim(a, b)
    np.testing.assert_allclose(ssim(a, b, batch_size=2), full, rtol=0, atol=0)
    assert ssim(a[1], b[1])[0] == full[1]
    assert ssim(torch.from_numpy(a), torch.from_numpy(b)).tolist() == full.tolist()


def test_bad_inputs():
    a = np.zeros((2, 12, 12, 3), np.uint8)
    with pytest.raises(ValueError, match="differ in shape"):
        ssim(a, a[:1])
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a[:, :10], a[:, :10])
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        psnr(a[0, 0], a[0, 0])
    with pytest.raises(ValueError, match="uint8 or float"):
        psnr(a.astype(np.int32), a.astype(np.int32))


def test_against_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    rng = _rng()
    a = _images(rng, 2, 37, 45)
    b = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    ours, rel, p = ssim(a, b), ssim_released(a, b), psnr(a, b)
    for i in range(2):
        sk = metrics.structural_similarity(a[i].astype(np.float64), b[i].astype(np.float64), data_range=255,
                                           channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                           use_sample_covariance=False)
        assert ours[i] == pytest.approx(sk, abs=1e-12)
        # the released call, on its [0, 1] float32 images (skimage computes in float32 there)
        r01, g01 = a[i].astype(np.float32) / 255.0, b[i].astype(np.float32) / 255.0
        sk_rel = metrics.structural_similarity(r01, g01, data_range=2.0, channel_axis=-1)
        assert rel[i] == pytest.approx(float(sk_rel), abs=1e-6)
        assert p[i] == pytest.approx(metrics.peak_signal_noise_ratio(r01, g01), abs=1e-4)


# ---------------------------------------------------------------------------------------------------- Frechet

def test_frechet_features_against_scipy_form():
    pytest.importorskip("scipy")
    from dar_fast.eval.metrics import compute_statistics, frechet_distance
    rng = _rng()
    a = rng.standard_normal((300, 9))
    b = rng.standard_normal((200, 9)) @ rng.standard_normal((9, 9)) + rng.standard_normal(9)
    fd = frechet_distance_features(a, b)
    assert fd == pytest.approx(frechet_distance(*compute_statistics(a), *compute_statistics(b)), rel=1e-8)
    assert frechet_distance_features(a, a) == pytest.approx(0.0, abs=1e-9)
    # a constant feature (singular covariance) is fine: it adds its squared mean difference only
    a1 = np.concatenate([a, np.zeros((300, 1))], axis=1)
    b1 = np.concatenate([b, np.full((200, 1), 2.0)], axis=1)
    assert frechet_distance_features(a1, b1) == pytest.approx(fd + 4.0, rel=1e-8)
