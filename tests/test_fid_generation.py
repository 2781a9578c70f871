"""`dar-fast fid`: the same .npz for any process count and batch size, resumable, strict about settings."""
import os
import subprocess
import sys

import numpy as np
import pytest

import dar_fast
from helpers import tiny_ar, tiny_tokenizer


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("fid_models")
    tok = tiny_tokenizer(seed=3)
    ar = tiny_ar(seed=4, vocab_size=tok.codebook_size, block_size=tok.num_tokens)
    dar_fast.save_tokenizer(tok, str(d / "tok.safetensors"))
    dar_fast.save_ar(ar, str(d / "ar.safetensors"))
    return str(d / "tok.safetensors"), str(d / "ar.safetensors")


def _args(ckpts, out, n=10, bs=4, extra=()):
    return ["fid", "--tokenizer", ckpts[0], "--ar", ckpts[1], "--num-samples", str(n), "--batch-size", str(bs),
            "--cfg", "1.1,4", "--seed", "3", "--out", str(out), "--device", "cpu", *extra]


def _run(argv):
    from dar_fast.cli import main
    return main(argv)


def _torchrun(argv, nproc=2, env_extra=None, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           "-m", "dar_fast.cli", *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _compare(a_path, b_path):
    a, b = np.load(a_path), np.load(b_path)
    assert np.array_equal(a["arr_1"], b["arr_1"])
    d = np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int))
    frac = (d > 0).mean()
    assert d.max() <= 1, d.max()
    assert frac < 0.01, frac        # measured fraction of values that differ by float rounding
    return frac


def test_npz_format_and_labels(ckpts, tmp_path):
    out = tmp_path / "s.npz"
    assert _run(_args(ckpts, out)) == 0
    z = np.load(out)
    assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (10, 32, 32, 3)
    assert z["arr_1"].tolist() == [i % 5 for i in range(10)]
    assert not os.path.exists(str(out) + ".shards")


def test_batch_size_invariance(ckpts, tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert _run(_args(ckpts, a, bs=4)) == 0
    assert _run(_args(ckpts, b, bs=3)) == 0
    _compare(a, b)


@pytest.mark.dist
def test_one_vs_two_processes(ckpts, tmp_path):
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    assert _run(_args(ckpts, one, n=9, bs=2)) == 0
    r = _torchrun(_args(ckpts, two, n=9, bs=2))
    assert r.returncode == 0, r.stderr[-3000:]
    _compare(one, two)


def test_crash_and_resume_gives_the_same_file(ckpts, tmp_path):
    full, crashed = tmp_path / "full.npz", tmp_path / "crashed.npz"
    assert _run(_args(ckpts, full, extra=["--keep-shards"])) == 0
    # simulate a crash: a run that leaves two finished shards and a stray temporary file
    shards = str(crashed) + ".shards"
    assert _run(_args(ckpts, crashed, n=10, extra=["--keep-shards"])) == 0
    os.remove(crashed)
    kept = sorted(f for f in os.listdir(shards) if f.startswith("shard_"))
    for f in kept[2:]:
        os.remove(os.path.join(shards, f))
    open(os.path.join(shards, "shard_000002.npz.tmp123.npz"), "wb").write(b"partial")
    mtimes = {f: os.path.getmtime(os.path.join(shards, f)) for f in kept[:2]}
    assert _run(_args(ckpts, crashed, extra=["--keep-shards"])) == 0
    for f, m in mtimes.items():               # finished shards were skipped, not redone
        assert os.path.getmtime(os.path.join(shards, f)) == m
    a, b = np.load(full), np.load(crashed)
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])


def test_resume_with_other_settings_is_refused(ckpts, tmp_path):
    out = tmp_path / "s.npz"
    assert _run(_args(ckpts, out, extra=["--keep-shards"])) == 0
    os.remove(out)
    assert _run(_args(ckpts, out, extra=["--keep-shards", "--temperature", "0.9"])) == 2
    assert not out.exists()


def test_bad_arguments(ckpts, tmp_path):
    assert _run(_args(ckpts, tmp_path / "x.bin")) == 2
    assert _run(["fid", "--tokenizer", ckpts[0], "--out", str(tmp_path / "y.npz")]) == 2
    assert not (tmp_path / "y.npz").exists()
