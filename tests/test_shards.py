"""dar_fast.shards: every way a shard or an output can be wrong is caught; nothing finished is replaced silently."""
import json
import os
import signal
import time
import zipfile

import numpy as np
import pytest

from dar_fast.errors import UsageError
from dar_fast.io import atomic_write, file_sha256, remove_stale_temps
from dar_fast.shard_io import OutputLock, assemble_npz, verify_npz, verify_shard, write_shard
from dar_fast.shards import ShardedOutput, ShardWriter, manifest_path, read_manifest

FIELDS = {"images": ((3, 5, 3), np.uint8), "labels": ((), np.int64)}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DAR_FAST_CACHE", str(tmp_path / "cache"))


def _arrays(start, count, rng=None):
    rng = rng or np.random.default_rng(start)
    return dict(images=rng.integers(0, 256, (count, 3, 5, 3), dtype=np.uint8),
                labels=np.arange(start, start + count, dtype=np.int64) % 7)


def _so(tmp_path, settings=None, n=11, bs=4, overwrite=False, logs=None):
    out = str(tmp_path / "o.npz")
    return ShardedOutput(out, settings or {"a": 1}, num_items=n, shard_size=bs, fields=FIELDS,
                         outputs={out: {"arr_0": "images", "arr_1": "labels"}}, overwrite=overwrite,
                         log=(logs.append if logs is not None else lambda m: None))


def _run(so, logs=None):
    """A complete generation through the protocol; returns the manifest or 'done'."""
    if so.begin():
        return "done"
    for k in so.pending(range(so.num_shards)):
        s, e = so.index_range(k)
        so.write(k, **_arrays(s, e - s))
    return so.finish(regenerate=lambda k: so.write(k, **_arrays(*so.index_range(k)[:1],
                                                                 so.index_range(k)[1] - so.index_range(k)[0])))


# ------------------------------------------------------------------------------------------- shard files

def test_shard_roundtrip_and_every_corruption(tmp_path):
    p = str(tmp_path / "s.npz")
    a = _arrays(8, 3)
    write_shard(p, 8, a)
    assert verify_shard(p, 8, 3, FIELDS) is None
    assert "holds items [8, +3)" in verify_shard(p, 4, 3, FIELDS)            # a swapped shard
    assert "expected [8, +4)" in verify_shard(p, 8, 4, FIELDS)               # a short shard
    wrong_size = {"images": ((3, 6, 3), np.uint8), "labels": ((), np.int64)}
    assert "per item" in verify_shard(p, 8, 3, wrong_size)                   # another image size
    # a float shard (once cast to 0/1 silently)
    write_shard(p, 8, dict(images=a["images"].astype(np.float32), labels=a["labels"]))
    assert "float32" in verify_shard(p, 8, 3, FIELDS)
    # flipped byte inside the data: the checksum catches it
    write_shard(p, 8, a)
    raw = bytearray(open(p, "rb").read())
    member = zipfile.ZipFile(p).getinfo("images.npy")
    raw[member.header_offset + 30 + len("images.npy") + 128 + 5] ^= 0xFF
    open(p, "wb").write(bytes(raw))
    assert verify_shard(p, 8, 3, FIELDS) is not None
    # truncated, empty, missing, foreign
    write_shard(p, 8, a)
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])
    assert verify_shard(p, 8, 3, FIELDS).startswith("unreadable")
    open(p, "wb").close()
    assert verify_shard(p, 8, 3, FIELDS).startswith("unreadable")
    os.remove(p)
    assert verify_shard(p, 8, 3, FIELDS) == "missing"
    np.savez(p, **a)
    assert "no shard record" in verify_shard(p, 8, 3, FIELDS)


def test_write_refuses_wrong_arrays(tmp_path):
    so = _so(tmp_path)
    assert not so.begin()
    with pytest.raises(RuntimeError, match="expected uint8"):
        so.write(0, images=np.zeros((4, 3, 5, 3), np.float32), labels=np.zeros(4, np.int64))
    with pytest.raises(RuntimeError, match=r"\(4, 3, 5, 3\)"):
        so.write(0, images=np.zeros((3, 3, 5, 3), np.uint8), labels=np.zeros(3, np.int64))
    so.close()


# ------------------------------------------------------------------------------------------- assembly

def test_assemble_streams_exact_counts_and_verifies(tmp_path):
    p = str(tmp_path / "x.npz")
    chunks = [np.full((2, 4), i, np.uint8) for i in range(3)]
    h = assemble_npz(p, [("arr_0", (6, 4), np.uint8, lambda: iter(chunks))])
    z = np.load(p)
    assert np.array_equal(z["arr_0"], np.concatenate(chunks)) and len(h["arr_0"]) == 64
    verify_npz(p, {"arr_0": ((6, 4), np.uint8)}, h)
    with pytest.raises(RuntimeError, match="expected"):
        verify_npz(p, {"arr_0": ((7, 4), np.uint8)})
    before = open(p, "rb").read()
    with pytest.raises(RuntimeError, match="4 items written, expected 6"):       # too few: nothing replaced
        assemble_npz(p, [("arr_0", (6, 4), np.uint8, lambda: iter(chunks[:2]))])
    with pytest.raises(RuntimeError, match="a chunk is"):
        assemble_npz(p, [("arr_0", (6, 4), np.uint8, lambda: iter([np.zeros((6, 5), np.uint8)]))])
    assert open(p, "rb").read() == before
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]              # no temp left behind
    # same content, later write: the same bytes (fixed zip member dates)
    assemble_npz(p, [("arr_0", (6, 4), np.uint8, lambda: iter(chunks))])
    assert open(p, "rb").read() == before


def test_atomic_write_verify_refuses_and_keeps_old(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"old")

    def bad(tmp):
        raise RuntimeError("no")
    with pytest.raises(RuntimeError):
        atomic_write(p, lambda f: f.write(b"new"), verify=bad)
    assert p.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_remove_stale_temps_only_ours(tmp_path):
    (tmp_path / ".o.npz.abc123.tmp").write_bytes(b"x")
    (tmp_path / ".other.npz.abc.tmp").write_bytes(b"x")
    (tmp_path / "o.npz").write_bytes(b"x")
    assert remove_stale_temps(tmp_path, "o.npz") == 1
    assert sorted(os.listdir(tmp_path)) == [".other.npz.abc.tmp", "o.npz"]


def test_file_sha256_cached_by_size_and_mtime(tmp_path):
    p = tmp_path / "m.bin"
    p.write_bytes(b"a" * 1000)
    h1 = file_sha256(p)
    cache = json.loads((tmp_path / "cache" / "sha256.json").read_text())
    assert list(cache.values()) == [h1]
    p.write_bytes(b"b" * 1000)                     # same size; the mtime changes
    os.utime(p, ns=(1, 2))
    h2 = file_sha256(p)
    assert h2 != h1 and h2 == file_sha256(p, use_cache=False)


# ------------------------------------------------------------------------------------------- protocol

def test_protocol_end_to_end_and_rerun_is_a_no_op(tmp_path):
    so = _so(tmp_path)
    m = _run(so)
    out = so.out
    z = np.load(out)
    assert z["arr_0"].shape == (11, 3, 5, 3) and z["arr_1"].tolist() == [i % 7 for i in range(11)]
    assert read_manifest(out)["settings"] == {"a": 1} and m["num_items"] == 11
    assert os.path.exists(manifest_path(out)) and manifest_path(out).endswith("o.json")
    assert not os.path.exists(out + ".shards") and not os.path.exists(out + ".lock")
    mtime = os.stat(out).st_mtime_ns
    assert _run(_so(tmp_path)) == "done" and os.stat(out).st_mtime_ns == mtime


def test_background_writer_gives_the_same_file_and_raises_write_errors(tmp_path):
    """ShardWriter (fid's overlap of generation and writing): the same .npz as writing in the loop; a failing
    write is raised in the generating thread, and the shards queued before it are still written."""
    ref = tmp_path / "ref"
    ref.mkdir()
    _run(_so(ref))
    so = _so(tmp_path)
    assert not so.begin()
    w = ShardWriter(so, depth=1)
    for k in so.pending(range(so.num_shards)):
        s, e = so.index_range(k)
        w.put(k, _arrays(s, e - s))
    w.close()
    so.finish(regenerate=None)
    assert open(so.out, "rb").read() == open(ref / "o.npz", "rb").read()

    (tmp_path / "x").mkdir()
    so2 = _so(tmp_path / "x")
    assert not so2.begin()
    w = ShardWriter(so2, depth=1)
    w.put(0, _arrays(0, 4))
    w.put(1, dict(images=np.zeros((2, 2), np.uint8), labels=np.zeros(4, np.int64)))    # wrong shape: refused
    with pytest.raises(Exception):
        for k in (2, 2, 2):          # the error surfaces at a later put or at close
            w.put(k, _arrays(8, 3))
        w.close()
    assert so2.pending([0, 1]) == [1]          # shard 0 was written before the failure
    so2.close()


def test_finished_result_not_replaced_by_other_settings(tmp_path):
    _run(_so(tmp_path))
    out = str(tmp_path / "o.npz")
    before = open(out, "rb").read()
    with pytest.raises(UsageError, match=r"other settings \(a: 1 -> 2\).*--overwrite"):
        _so(tmp_path, {"a": 2}).begin()
    assert open(out, "rb").read() == before
    assert not os.path.exists(out + ".lock") or OutputLock(out).acquire().release() is None   # lock was released
    m = _run(_so(tmp_path, {"a": 2}, overwrite=True))
    assert m["settings"] == {"a": 2} and read_manifest(out)["settings"] == {"a": 2}


def test_output_without_manifest_is_not_replaced(tmp_path):
    out = tmp_path / "o.npz"
    out.write_bytes(b"someone else's file")
    with pytest.raises(UsageError, match="does not describe it"):
        _so(tmp_path).begin()
    assert out.read_bytes() == b"someone else's file"


def test_corrupted_shard_is_detected_and_regenerated(tmp_path):
    logs = []
    so = _so(tmp_path, logs=logs)
    assert not so.begin()
    for k in range(so.num_shards):
        s, e = so.index_range(k)
        so.write(k, **_arrays(s, e - s))
    # after generation, before assembly: shard 1 truncated, shard 2 replaced by shard 0 (a swap)
    data = open(so.shard_path(1), "rb").read()
    open(so.shard_path(1), "wb").write(data[:100])
    os.replace(so.shard_path(0), so.shard_path(2))
    regenerated = []

    def regen(k):
        regenerated.append(k)
        s, e = so.index_range(k)
        so.write(k, **_arrays(s, e - s))
    so.finish(regenerate=regen)
    assert regenerated == [0, 1, 2]
    assert any("shard 1" in m and "unreadable" in m for m in logs)
    assert any("shard 2" in m and "holds items [0, +4)" in m for m in logs)
    ref = np.concatenate([_arrays(s, e - s)["images"] for s, e in map(so.index_range, range(3))])
    assert np.array_equal(np.load(so.out)["arr_0"], ref)


def test_unfinished_shards_of_other_settings_refused(tmp_path):
    so = _so(tmp_path)
    assert not so.begin()
    so.write(0, **_arrays(0, 4))
    so.close()
    with pytest.raises(UsageError, match="unfinished run with other settings"):
        _so(tmp_path, {"a": 3}).begin()
    so3 = _so(tmp_path, {"a": 3}, overwrite=True)
    assert not so3.begin() and so3.pending([0]) == [0]      # the old shard was discarded
    so3.close()


def test_stale_temps_removed_on_start(tmp_path):
    so = _so(tmp_path)
    assert not so.begin()
    so.write(0, **_arrays(0, 4))
    so.close()
    stale = [os.path.join(so.dir, ".shard_000001.npz.x1.tmp"), os.path.join(so.dir, "shard_000002.npz.tmp9.npz"),
             str(tmp_path / ".o.npz.zz.tmp")]
    for p in stale:
        open(p, "wb").write(b"partial")
    assert _run(_so(tmp_path))["num_items"] == 11
    assert not any(os.path.exists(p) for p in stale)


def test_lock_excludes_a_second_run(tmp_path):
    out = str(tmp_path / "o.npz")
    r, w = os.pipe()
    pid = os.fork()              # a second process (forked: no second interpreter start-up) holds the lock
    if pid == 0:
        try:
            OutputLock(out).acquire()
            os.write(w, b"L")
            time.sleep(60)
        finally:
            os._exit(0)
    try:
        assert os.read(r, 1) == b"L"
        with pytest.raises(UsageError, match=f"another run \\(pid {pid}\\) is writing"):
            _so(tmp_path).begin()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert _run(_so(tmp_path))["num_items"] == 11       # the holder died: its lock went with it


def test_kill_after_manifest_before_cleanup_is_finished_on_rerun(tmp_path):
    so = _so(tmp_path)
    assert not so.begin()
    for k in range(so.num_shards):
        s, e = so.index_range(k)
        so.write(k, **_arrays(s, e - s))
    so.finish(keep_shards=True)
    m = read_manifest(so.out)
    m["shards_kept"] = False                  # as if killed after the manifest, before the shards were removed
    json.dump(m, open(manifest_path(so.out), "w"))
    assert _run(_so(tmp_path)) == "done"
    assert not os.path.exists(so.dir)
    out = str(tmp_path / "k.npz")                      # --keep-shards results keep their shards on a rerun
    keep = ShardedOutput(out, {"a": 1}, num_items=5, shard_size=2, fields=FIELDS, log=lambda m: None)
    assert not keep.begin()
    for k in range(keep.num_shards):
        s, e = keep.index_range(k)
        keep.write(k, **_arrays(s, e - s))
    keep.finish(keep_shards=True)
    again = ShardedOutput(out, {"a": 1}, num_items=5, shard_size=2, fields=FIELDS, log=lambda m: None)
    assert again.begin() and len(os.listdir(keep.dir)) == 4   # 3 shards + the shard-dir manifest
