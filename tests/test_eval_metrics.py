"""FID, Inception Score and precision/recall against closed forms and brute-force references."""
import math

import numpy as np
import pytest
import torch

scipy_linalg = pytest.importorskip("scipy.linalg")

from dar_fast.eval.metrics import (  # noqa: E402
    compute_statistics,
    frechet_distance,
    inception_score,
    knn_radii,
    precision_recall,
)


def _rng():
    return np.random.default_rng()  # fresh inputs every run


def _random_cov(rng, d):
    a = rng.standard_normal((d, d + 3))
    return a @ a.T / d + 0.1 * np.eye(d)


def _sym_sqrt(s):
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


# ---------------------------------------------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------------------------------------------

def test_frechet_diagonal_closed_form():
    rng = _rng()
    d = 13
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    want = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert isinstance(got, float)
    assert got == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_frechet_full_covariances_vs_direct_and_symmetric_route():
    rng = _rng()
    d = 31
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    got = frechet_distance(mu1, s1, mu2, s2)
    # direct: the textbook formula with scipy's sqrtm
    direct = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy_linalg.sqrtm(s1 @ s2).real)
    # independent: Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2), a symmetric PSD matrix (eigh only)
    r = _sym_sqrt(s1)
    sym = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(
        np.linalg.eigvalsh(r @ s2 @ r), 0, None)))
    assert got == pytest.approx(direct, rel=1e-9)
    assert got == pytest.approx(sym, rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)
    # symmetric in its arguments
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-9)


def test_frechet_rank_deficient_covariances_stay_finite():
    rng = _rng()
    a = rng.standard_normal((9, 20))  # 9 samples in 20 dims: covariance of rank 8
    b = rng.standard_normal((9, 20)) + 0.5
    sa, sb = compute_statistics(a), compute_statistics(b)
    assert np.linalg.matrix_rank(sa[1]) == 8
    with np.errstate(all="ignore"):
        same = frechet_distance(*sa, *sa)
        other = frechet_distance(*sa, *sb)
    assert abs(same) < 1e-4
    assert math.isfinite(other) and other > 0


def test_frechet_shape_errors():
    with pytest.raises(ValueError, match="mean vectors"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


def test_compute_statistics():
    rng = _rng()
    x = rng.standard_normal((57, 6)).astype(np.float32)
    mu, sigma = compute_statistics(x)
    assert mu.dtype == np.float64 and sigma.shape == (6, 6)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mu, x64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, (x64 - x64.mean(0)).T @ (x64 - x64.mean(0)) / 56, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError):
        compute_statistics(x[:1])


# ---------------------------------------------------------------------------------------------------------------
# Inception Score
# ---------------------------------------------------------------------------------------------------------------

def test_inception_score_uniform_is_one():
    mean, std = inception_score(np.zeros((50, 1008), np.float32))
    assert mean == pytest.approx(1.0, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("classes", [2, 7, 10])
def test_inception_score_confident_balanced_is_num_classes(classes):
    n = 10 * classes  # each of the 10 sequential splits holds every class once
    labels = np.arange(n) % classes
    logits = np.zeros((n, 1008), np.float32)
    logits[np.arange(n), labels] = 80.0  # p(other) ~ e^-80: one-hot to float64 precision
    mean, std = inception_score(logits)
    assert mean == pytest.approx(classes, rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-8)


def _is_numpy(logits, splits):
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    n = len(p)
    scores = []
    for k in range(splits):
        part = p[k * n // splits:(k + 1) * n // splits]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return np.mean(scores), np.std(scores)


@pytest.mark.parametrize("n,splits", [(103, 10), (60, 10), (37, 3)])
def test_inception_score_vs_numpy_formula(n, splits):
    logits = (3 * _rng().standard_normal((n, 41))).astype(np.float32)
    mean, std = inception_score(logits, splits=splits)
    want_mean, want_std = _is_numpy(logits, splits)
    assert mean == pytest.approx(want_mean, rel=1e-10)
    assert std == pytest.approx(want_std, rel=1e-8, abs=1e-12)


def test_inception_score_splits_are_sequential():
    # two halves with different confident classes: sequential splits each see ONE class (IS 1);
    # shuffled, each split would see two classes (IS 2)
    logits = np.zeros((20, 5))
    logits[:10, 0] = 80.0
    logits[10:, 1] = 80.0
    assert inception_score(logits, splits=2)[0] == pytest.approx(1.0, abs=1e-9)
    assert inception_score(logits, splits=1)[0] == pytest.approx(2.0, rel=1e-9)


def test_inception_score_underflow_is_not_nan():
    logits = np.zeros((10, 4))
    logits[:, 0] = 2000.0  # softmax underflows to exactly 0 for the other classes
    mean, _ = inception_score(logits)
    assert mean == pytest.approx(1.0)


def test_inception_score_needs_enough_samples():
    with pytest.raises(ValueError, match="splits"):
        inception_score(np.zeros((9, 3)), splits=10)


# ---------------------------------------------------------------------------------------------------------------
# Precision / recall
# ---------------------------------------------------------------------------------------------------------------

def _pr_bruteforce(real, fake, k):
    real, fake = real.astype(np.float64), fake.astype(np.float64)

    def radii(x):
        d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
        np.fill_diagonal(d, np.inf)  # exclude self
        return np.sort(d, axis=1)[:, k - 1]

    r_real, r_fake = radii(real), radii(fake)
    d_rf = np.sqrt(((real[:, None, :] - fake[None, :, :]) ** 2).sum(-1))  # (Nr, Nf)
    precision = np.mean([np.any(d_rf[:, j] <= r_real) for j in range(len(fake))])
    recall = np.mean([np.any(d_rf[i, :] <= r_fake) for i in range(len(real))])
    return precision, recall, r_real, r_fake


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("batch_size", [10000, 16, 37])
def test_precision_recall_vs_bruteforce(k, batch_size):
    rng = _rng()
    real = rng.standard_normal((137, 17))
    fake = 0.8 * rng.standard_normal((211, 17)) + 0.3  # overlapping, not identical: P and R strictly inside (0, 1)
    want_p, want_r, r_real, _ = _pr_bruteforce(real, fake, k)
    assert 0 < want_p < 1 and 0 < want_r < 1
    got = precision_recall(real, fake, k=k, batch_size=batch_size, dtype=torch.float64)
    assert got == (want_p, want_r)
    radii = knn_radii(torch.from_numpy(real), k=k, batch_size=batch_size).sqrt().numpy()
    np.testing.assert_allclose(radii, r_real, rtol=1e-9)


def test_precision_recall_float32_matches_float64():
    rng = _rng()
    real = rng.standard_normal((137, 17)).astype(np.float32) * 5 + 10  # offset: the |a|^2 expansion loses digits
    fake = rng.standard_normal((211, 17)).astype(np.float32) * 5 + 11
    p32, r32 = precision_recall(real, fake, batch_size=50)
    p64, r64 = precision_recall(real, fake, batch_size=50, dtype=torch.float64)
    # only points within float32 round-off of a radius could flip: at most one here
    assert abs(p32 - p64) <= 1 / 211 and abs(r32 - r64) <= 1 / 137


def test_precision_recall_identical_disjoint_and_duplicates():
    rng = _rng()
    x = rng.standard_normal((40, 5))
    assert precision_recall(x, x, batch_size=7) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0, batch_size=7) == (0.0, 0.0)
    # duplicated points: a point's copy is its nearest neighbour at distance 0
    dup = np.concatenate([x, x[:10]])
    want = _pr_bruteforce(dup, x + 0.01, 1)[:2]
    assert precision_recall(dup, x + 0.01, k=1, batch_size=9, dtype=torch.float64) == want
    r = knn_radii(torch.from_numpy(dup), k=1, batch_size=9)
    assert r[:10].abs().max() < 1e-12 and r[40:].abs().max() < 1e-12  # 0 up to the |a|^2 - 2ab + |b|^2 round-off


def test_precision_recall_errors():
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(np.zeros((3, 4)), np.ones((10, 4)))
    with pytest.raises(ValueError, match="dims"):
        precision_recall(np.zeros((10, 4)), np.ones((10, 5)))


@pytest.mark.gpu
def test_precision_recall_cuda_matches_cpu():
    rng = _rng()
    real = rng.standard_normal((1501, 64))
    fake = 0.9 * rng.standard_normal((1203, 64)) + 0.1
    cpu = precision_recall(real, fake, batch_size=500, dtype=torch.float64)
    gpu = precision_recall(real, fake, batch_size=500, dtype=torch.float64, device="cuda")
    assert cpu == gpu


def test_full_fp32_sets_and_restores():
    from dar_fast.eval.metrics import full_fp32
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("medium")
    torch.backends.cudnn.allow_tf32 = True
    try:
        with pytest.raises(KeyError):
            with full_fp32():
                assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
                raise KeyError  # restored on the way out of an exception too
        assert torch.get_float32_matmul_precision() == "medium" and torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]
