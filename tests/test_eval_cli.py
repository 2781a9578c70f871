"""`dar-fast eval` end to end on tiny npz files with a random-weight Inception, and its input errors."""
import argparse
import json
import math
import os
import re

import numpy as np
import pytest
import torch

pytest.importorskip("scipy")

from dar_fast.eval.cli import register, run  # noqa: E402
from dar_fast.eval.inception import (  # noqa: E402
    INCEPTION_ENV,
    INCEPTION_FILENAME,
    extract_features,
    load_inception,
)
from dar_fast.eval.metrics import compute_statistics  # noqa: E402
from helpers import random_inception_state_dict as random_state_dict  # noqa: E402
from dar_fast.eval.npz import load_reference, load_samples, save_npz_atomic, write_json_atomic  # noqa: E402

N = 12  # images per file: >= 10 for the 10 IS splits; 32x32 keeps the 299x299 forwards few


def _parse(*argv):
    p = argparse.ArgumentParser(prog="dar-fast")
    register(p.add_subparsers(dest="command"))
    return p.parse_args(["eval", *map(str, argv)])


def _run(capsys, *argv):
    args = _parse(*argv, "--device", "cpu", "--batch-size", 8, "--no-progress")
    rc = args.func(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    weights = d / INCEPTION_FILENAME
    torch.save(random_state_dict(seed=2), weights)
    rng = np.random.default_rng()
    a = rng.integers(0, 256, (N, 32, 32, 3), dtype=np.uint8)
    # b: another distribution (smooth gradients with a colour cast), so FID(a, b) is clearly > 0
    ramp = np.linspace(0, 1, 32)[None, :, None, None] * np.linspace(0, 1, 32)[None, None, :, None]
    b = np.clip(ramp * rng.uniform(100, 255, (N, 1, 1, 3)) + rng.normal(0, 8, (N, 32, 32, 3)), 0, 255).astype(np.uint8)
    np.savez(d / "a.npz", a, np.arange(N) % 3)
    np.savez(d / "b.npz", b)
    feats = extract_features(a, load_inception(weights), batch_size=8, device="cpu", progress=False)
    mu, sigma = compute_statistics(feats["pool"])
    mu_s, sigma_s = compute_statistics(feats["spatial"])
    np.savez(d / "a_stats.npz", mu=mu, sigma=sigma)
    np.savez(d / "a_stats_spatial.npz", mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    return d, weights


FIELDS = ("fid", "sfid", "inception_score", "inception_score_std", "precision", "recall")


@pytest.mark.slow  # two scipy sqrtm of ~2048x2048 singular products: tens of seconds on 2 CPU cores
def test_eval_same_images_gives_zero_fid(files, capsys):
    d, weights = files
    out = d / "same.json"
    rc, stdout, _ = _run(capsys, "--ref", d / "a.npz", "--sample", d / "a.npz", "--inception", weights, "--out", out)
    assert rc == 0
    m = json.loads(out.read_text())
    for k in FIELDS:
        assert isinstance(m[k], float) and math.isfinite(m[k]), k
    assert abs(m["fid"]) < 1e-2 and abs(m["sfid"]) < 1e-2
    assert m["precision"] == 1.0 and m["recall"] == 1.0
    assert m["inception_score"] >= 1.0 - 1e-9
    assert m["num_samples"] == N and m["num_reference_images"] == N and m["reference_statistics"] == "computed"
    assert "FID" in stdout and "Precision" in stdout
    assert sorted(os.listdir(d)) == sorted(["a.npz", "b.npz", "a_stats.npz", "a_stats_spatial.npz",
                                            INCEPTION_FILENAME, "same.json"])  # no temp files left
    out.unlink()


@pytest.fixture
def fd_spy(monkeypatch):
    """Record what the CLI hands to frechet_distance (and skip the ~2048^3 sqrtm, tested in test_eval_metrics)."""
    calls = []

    def spy(mu1, sigma1, mu2, sigma2):
        calls.append((mu1, sigma1, mu2, sigma2))
        return float(np.sum((mu1 - mu2) ** 2)) + 1.0

    monkeypatch.setattr("dar_fast.eval.cli.frechet_distance", spy)
    return calls


def test_eval_image_reference_gives_every_metric(files, capsys, fd_spy):
    d, weights = files
    out = d / "a_vs_b.json"
    rc, stdout, _ = _run(capsys, "--ref", d / "b.npz", "--sample", d / "a.npz", "--inception", weights, "--out", out)
    assert rc == 0
    m = json.loads(out.read_text())
    for k in FIELDS:
        assert isinstance(m[k], float) and math.isfinite(m[k]), k
    assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1 and m["inception_score"] >= 1.0 - 1e-9
    assert [c[0].shape for c in fd_spy] == [(2048,), (2023,)]  # FID on pool_3, sFID on the spatial features
    assert m["reference_statistics"] == "computed" and m["num_reference_images"] == N
    assert "sFID" in stdout and "Recall" in stdout
    out.unlink()


@pytest.mark.slow     # another full Inception pass + 2048x2048 sqrtm: ~35 s on 2 busy cores
def test_eval_precomputed_reference_statistics_are_used_as_given(files, capsys, fd_spy):
    d, weights = files
    out = d / "b_vs_a.json"
    rc, _, _ = _run(capsys, "--ref", d / "a_stats_spatial.npz", "--sample", d / "b.npz", "--inception", weights,
                    "--out", out)
    assert rc == 0
    m = json.loads(out.read_text())
    ref = np.load(d / "a_stats_spatial.npz")
    (mu, sigma, mu_r, sigma_r), (mu_s, sigma_s, mu_rs, sigma_rs) = fd_spy
    assert np.array_equal(mu_r, ref["mu"]) and np.array_equal(sigma_r, ref["sigma"])
    assert np.array_equal(mu_rs, ref["mu_s"]) and np.array_equal(sigma_rs, ref["sigma_s"])
    # the sample side: statistics of b's own features
    feats = extract_features(load_samples(d / "b.npz")[0], load_inception(weights), 8, "cpu", progress=False)
    np.testing.assert_allclose(mu, feats["pool"].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mu_s, feats["spatial"].mean(0), rtol=1e-5, atol=1e-6)
    assert sigma.shape == (2048, 2048) and sigma_s.shape == (2023, 2023)
    assert m["fid"] == pytest.approx(np.sum((mu - mu_r) ** 2) + 1.0) and m["fid"] > 1.0  # b is not a
    assert m["precision"] is None and m["recall"] is None  # no reference images to take radii from
    assert m["reference_statistics"] == "precomputed" and m["num_reference_images"] is None
    out.unlink()


def test_eval_env_var_num_samples_and_no_spatial_stats(files, capsys, monkeypatch, fd_spy):
    d, weights = files
    monkeypatch.setenv(INCEPTION_ENV, str(weights))
    out = d / "env.json"
    rc, _, _ = _run(capsys, "--ref", d / "a_stats.npz", "--sample", d / "a.npz", "--num-samples", 10, "--out", out)
    assert rc == 0
    m = json.loads(out.read_text())
    assert m["num_samples"] == 10
    assert len(fd_spy) == 1 and m["sfid"] is None          # reference has mu/sigma only: no sFID
    assert math.isfinite(m["fid"]) and math.isfinite(m["inception_score"])
    out.unlink()


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a clear message, exit status 2, no output file
# ---------------------------------------------------------------------------------------------------------------

def _bad_npz(d, kind):
    p = d / f"bad_{kind}.npz"
    imgs = np.zeros((12, 8, 8, 3), np.uint8)
    if kind == "no_arr_0":
        np.savez(p, images=imgs)
    elif kind == "float":
        np.savez(p, imgs.astype(np.float32))
    elif kind == "chw":
        np.savez(p, imgs.transpose(0, 3, 1, 2))
    elif kind == "gray":
        np.savez(p, imgs[..., 0])
    elif kind == "labels":
        np.savez(p, imgs, np.zeros(5, np.int64))
    elif kind == "npy":
        p = d / "bad.npy"
        np.save(p, imgs)
    elif kind == "garbage":
        p.write_bytes(b"not a zip")
    return p


@pytest.mark.parametrize("kind,match", [
    ("no_arr_0", "no 'arr_0'"), ("float", "dtype float32; expected uint8"), ("chw", "channels-first"),
    ("gray", r"expected RGB images \(N, H, W, 3\)"), ("labels", "arr_1"), ("npy", "single .npy"),
    ("garbage", "not a readable .npz"),
])
def test_eval_bad_sample_file(files, tmp_path, capsys, kind, match):
    d, weights = files
    bad = _bad_npz(tmp_path, kind)
    out = tmp_path / "m.json"
    rc, _, err = _run(capsys, "--ref", d / "a.npz", "--sample", bad, "--inception", weights, "--out", out)
    assert rc == 2
    assert "error" in err and str(bad) in err
    assert re.search(match, err), err
    assert not out.exists() and sorted(os.listdir(tmp_path)) == [bad.name]


def test_eval_missing_inception(files, tmp_path, capsys, monkeypatch):
    d, _ = files
    out = tmp_path / "m.json"
    missing = tmp_path / "nowhere" / INCEPTION_FILENAME
    rc, _, err = _run(capsys, "--ref", d / "a.npz", "--sample", d / "a.npz", "--inception", missing, "--out", out)
    assert rc == 2 and str(missing) in err and "github.com" in err and "never downloads" in err
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    rc, _, err = _run(capsys, "--ref", d / "a.npz", "--sample", d / "a.npz", "--out", out)
    assert rc == 2 and INCEPTION_ENV in err and "--inception" in err
    assert not out.exists()


@pytest.mark.parametrize("case", ["missing_sample", "missing_ref", "num_samples", "out_dir", "half_stats",
                                  "stats_dim", "few_samples", "batch_size", "device"])
def test_eval_other_errors(files, tmp_path, capsys, case):
    d, weights = files
    ref, sample, out, extra = d / "a.npz", d / "a.npz", tmp_path / "m.json", []
    if case == "missing_sample":
        sample, match = tmp_path / "none.npz", "sample file not found"
    elif case == "missing_ref":
        ref, match = tmp_path / "none.npz", "reference file not found"
    elif case == "num_samples":
        extra, match = ["--num-samples", 1000], f"holds {N} samples"
    elif case == "out_dir":
        out, match = tmp_path / "no" / "m.json", "does not exist"
    elif case == "half_stats":
        ref = tmp_path / "half.npz"
        np.savez(ref, mu=np.zeros(2048))
        match = "'mu' without 'sigma'"
    elif case == "stats_dim":
        ref = tmp_path / "dim.npz"
        np.savez(ref, mu=np.zeros(64), sigma=np.eye(64))
        match = "2048 dims"
    elif case == "few_samples":
        sample = tmp_path / "few.npz"
        np.savez(sample, np.zeros((9, 8, 8, 3), np.uint8))
        match = "need at least 10"
    elif case == "batch_size":
        extra, match = ["--batch-size", 0], "--batch-size must be >= 1"
    else:
        extra, match = ["--device", "bogus"], "--device"
    args = _parse("--ref", ref, "--sample", sample, "--inception", weights, "--out", out,
                  *extra, "--no-progress", *([] if case in ("batch_size", "device") else ["--device", "cpu"]))
    rc = run(args)
    err = capsys.readouterr().err
    assert rc == 2 and match in err, err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# npz helpers
# ---------------------------------------------------------------------------------------------------------------

def test_load_samples_and_reference(files):
    d, _ = files
    imgs, labels = load_samples(d / "a.npz")
    assert imgs.shape == (N, 32, 32, 3) and imgs.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.arange(N) % 3)
    assert load_samples(d / "b.npz")[1] is None
    ref = load_reference(d / "a_stats_spatial.npz")
    assert ref.images is None and ref.mu.shape == (2048,) and ref.sigma_s.shape == (2023, 2023)
    assert ref.mu.dtype == np.float64
    ref = load_reference(d / "a.npz")
    assert ref.images.shape == (N, 32, 32, 3) and ref.mu is None


def test_load_reference_needs_images_or_statistics(tmp_path):
    p = tmp_path / "empty.npz"
    np.savez(p, something=np.zeros(3))
    with pytest.raises(ValueError, match="neither images"):
        load_reference(p)
    np.savez(p, mu=np.zeros(3), sigma=np.full((3, 3), np.nan))
    with pytest.raises(ValueError, match="NaN"):
        load_reference(p)


def test_save_npz_atomic(tmp_path):
    p = tmp_path / "x.npz"
    save_npz_atomic(p, arr_0=np.arange(6, dtype=np.uint8).reshape(1, 1, 2, 3))
    assert load_samples(p)[0].shape == (1, 1, 2, 3)
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask  # the mode open() gives, not mkstemp's private 0600

    class Boom:
        def __array__(self, *a, **k):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_npz_atomic(p, arr_0=np.zeros(3), arr_1=Boom())
    assert load_samples(p)[0].shape == (1, 1, 2, 3)  # the old file is untouched
    with pytest.raises(RuntimeError, match="boom"):
        save_npz_atomic(tmp_path / "new.npz", arr_0=Boom())
    assert sorted(os.listdir(tmp_path)) == ["x.npz"]   # no half-written file, no temp file

    write_json_atomic(tmp_path / "m.json", {"fid": 1.5})
    assert json.loads((tmp_path / "m.json").read_text()) == {"fid": 1.5}
