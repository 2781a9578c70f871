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


# ------------------------------------------------------------------------------------------ reliability (#15)

@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DAR_FAST_CACHE", str(tmp_path / "hash_cache"))   # never write the user's ~/.cache


def _fork_run(argv) -> int:
    """Start `dar-fast ARGV` in a forked child (no interpreter start-up: the models and torch are loaded)."""
    import torch
    pid = os.fork()
    if pid == 0:                                      # child: run, never return into pytest
        code = 1
        try:
            torch.set_num_threads(1)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            code = _run(argv)
        finally:
            os._exit(code)
    return pid


def _run_killed(argv, delay):
    """SIGKILL a forked run after `delay` seconds. Returns True if the kill landed before the child finished."""
    import signal
    import time
    pid = _fork_run(argv)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status)


def test_kill9_at_random_points_then_rerun_is_byte_identical(ckpts, tmp_path):
    import random
    import time
    full, killed = tmp_path / "full.npz", tmp_path / "killed.npz"
    argv = _args(ckpts, killed, n=24, bs=2)
    assert _run(_args(ckpts, full, n=24, bs=2)) == 0
    t0 = time.perf_counter()                          # how long a warm forked run takes, start to end
    _, status = os.waitpid(_fork_run(_args(ckpts, tmp_path / "timing.npz", n=24, bs=2)), 0)
    t_run = time.perf_counter() - t0
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    # every kill resumes the last one's work: delays spread over a whole run land from start-up to assembly
    # (the first within the first half, so at least one lands however fast the machine is at that moment)
    delays = [rng.uniform(0.02, 0.5) * t_run] + [rng.uniform(0.02, 0.9) * t_run for _ in range(4)]
    landed = [_run_killed(argv, d) for d in delays]
    shards = str(killed) + ".shards"
    # the stale leftovers a kill inside an atomic write leaves behind
    os.makedirs(shards, exist_ok=True)
    for p in (os.path.join(shards, ".shard_000003.npz.k9x.tmp"), str(tmp_path / ".killed.npz.k9y.tmp")):
        open(p, "wb").write(b"half a file")
    assert _run(argv) == 0, f"kill delays {delays} (seed {seed}, landed {landed})"
    assert open(full, "rb").read() == open(killed, "rb").read(), f"kill delays {delays} (seed {seed})"
    assert not os.path.exists(shards) and not [f for f in os.listdir(tmp_path) if f.startswith(".")]
    assert any(landed), f"no kill landed (delays {delays}, one run {t_run:.2f}s): nothing was tested"


def test_corrupted_shards_are_regenerated(ckpts, tmp_path, capsys):
    ref, out = tmp_path / "ref.npz", tmp_path / "s.npz"
    assert _run(_args(ckpts, ref)) == 0
    assert _run(_args(ckpts, out, extra=["--keep-shards"])) == 0
    os.remove(out)
    os.remove(tmp_path / "s.json")
    shards = str(out) + ".shards"
    s0, s1, s2 = (os.path.join(shards, f"shard_{k:06d}.npz") for k in range(3))
    open(s1, "r+b").truncate(200)                               # truncated
    os.replace(s0, s2)                                          # swapped: shard 0's images under shard 2's name
    capsys.readouterr()
    assert _run(_args(ckpts, out)) == 0
    err = capsys.readouterr().err
    assert "shard 1" in err and "shard 2" in err and "regenerating" in err
    assert open(ref, "rb").read() == open(out, "rb").read()


def test_finished_npz_is_kept_unless_overwrite(ckpts, tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert _run(_args(ckpts, out)) == 0
    before, mtime = open(out, "rb").read(), os.stat(out).st_mtime_ns
    capsys.readouterr()
    assert _run(_args(ckpts, out)) == 0                           # same settings: nothing to do
    assert "nothing to do" in capsys.readouterr().out and os.stat(out).st_mtime_ns == mtime
    assert _run(_args(ckpts, out, extra=["--temperature", "0.9"])) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "temperature: 1.0 -> 0.9" in err and "--overwrite" in err
    assert open(out, "rb").read() == before
    assert _run(_args(ckpts, out, extra=["--temperature", "0.9", "--overwrite"])) == 0
    import json
    assert json.load(open(tmp_path / "s.json"))["settings"]["temperature"] == 0.9
    assert open(out, "rb").read() != before


def test_resume_with_another_model_of_the_same_size_is_refused(ckpts, tmp_path):
    other = tmp_path / "ar_other.safetensors"
    tok = tiny_tokenizer(seed=3)
    dar_fast.save_ar(tiny_ar(seed=5, vocab_size=tok.codebook_size, block_size=tok.num_tokens), str(other))
    assert os.path.getsize(other) == os.path.getsize(ckpts[1])
    out = tmp_path / "s.npz"
    assert _run(_args(ckpts, out, extra=["--keep-shards"])) == 0
    os.remove(out)
    assert _run(_args((ckpts[0], str(other)), out, extra=["--keep-shards"])) == 2
    assert not out.exists()


@pytest.mark.parametrize("bad", [["--cfg", "nan"], ["--cfg", "1e30"], ["--cfg", "abc"], ["--temperature", "1e-30"],
                                 ["--temperature", "inf"], ["--top-p", "nan"], ["--seed", str(2 ** 63)]])
def test_bad_sampling_values_refused_before_anything_is_written(ckpts, tmp_path, bad, capsys):
    assert _run(_args(ckpts, tmp_path / "s.npz", extra=bad)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert os.listdir(tmp_path) == ["hash_cache"] or os.listdir(tmp_path) == []


@pytest.mark.slow
def test_kill9_of_cli_processes_then_rerun_is_byte_identical(ckpts, tmp_path):
    """Like the forked test, with whole `python -m dar_fast.cli fid` processes (start-up included) killed by
    SIGKILL at random moments, then one run to the end (about a minute on 2 busy cores)."""
    import random
    import time
    full, killed = tmp_path / "full.npz", tmp_path / "killed.npz"
    env = dict(os.environ, OMP_NUM_THREADS="1", DAR_FAST_CACHE=str(tmp_path / "hash_cache"))
    base = [sys.executable, "-m", "dar_fast.cli"]
    t0 = time.perf_counter()
    subprocess.run([*base, *_args(ckpts, full, n=40, bs=2)], env=env, check=True, capture_output=True, timeout=600)
    whole = time.perf_counter() - t0           # an uninterrupted process, start-up included
    cmd = [*base, *_args(ckpts, killed, n=40, bs=2)]
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    outcomes = []
    for _ in range(4):
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            # kill within the run's own duration (the first process, starting from nothing, is then killed;
            # fixed times would let a fast machine finish before any kill)
            outcomes.append(p.wait(timeout=rng.uniform(0.1, 0.85) * whole))
        except subprocess.TimeoutExpired:
            p.kill()                                          # SIGKILL
            outcomes.append(p.wait())
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (seed, outcomes, r.stderr[-2000:])
    assert open(full, "rb").read() == open(killed, "rb").read(), (seed, outcomes)
    assert -9 in outcomes, f"no process was killed (seed {seed}, exit codes {outcomes})"


def test_full_disk_is_one_line_and_resumable(ckpts, tmp_path, monkeypatch, capsys):
    import errno

    from dar_fast import shards as S
    ref, out = tmp_path / "ref.npz", tmp_path / "s.npz"
    assert _run(_args(ckpts, ref)) == 0
    real, calls = S.write_shard, []

    def full_disk(path, start, arrays):
        calls.append(start)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(path, start, arrays)
    monkeypatch.setattr(S, "write_shard", full_disk)
    capsys.readouterr()
    assert _run(_args(ckpts, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "No space left on device" in err[-1] and "rerun the same command" in err[-1] and not out.exists()
    monkeypatch.setattr(S, "write_shard", real)
    assert _run(_args(ckpts, out)) == 0
    assert open(ref, "rb").read() == open(out, "rb").read()
