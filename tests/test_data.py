"""Input pipelines: one contract for the DALI, torch and memory loaders (CPU; DALI runs in its CPU-only mode)."""
import io
import math
import os
import random
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from dar_fast.training import data as D
from dar_fast.training.data import dali as dali_backend
from dar_fast.training.data import (ArraySource, digits_split, load_digits_arrays, make_loader,
                                    make_ordered_loader, plan_crop, apply_plan, split_global_batch)

HAVE_DALI = D.dali_available()
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason=f"nvidia-dali not importable (pip install {D.DALI_PIP_PACKAGE})")
FILE_LOADERS = ["torch", pytest.param("dali", marks=needs_dali)]

CLASSES = ["ant", "bee", "cow"]
SIZES = [(50, 37), (37, 50), (41, 90), (70, 33), (97, 128), (20, 15), (64, 64)]
S = 16


def _blue(c):
    """Each class paints a constant blue channel, so a batch's pixels tell whether its labels are right."""
    return 40 + 80 * c


def _image(w, h, c, k):
    yy, xx = np.mgrid[0:h, 0:w]
    r = (xx * 7 + yy * 3 + 31 * k) % 256
    g = (yy * 255) // max(h - 1, 1)
    return np.stack([r, g, np.full_like(xx, _blue(c))], -1).astype(np.uint8)


def _jpeg(a):
    b = io.BytesIO()
    Image.fromarray(a).save(b, "JPEG", quality=95)
    return b.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes, 21 JPEGs of odd sizes, one PNG, one corrupt .jpg: 23 files."""
    root = tmp_path_factory.mktemp("imagefolder")
    k = 0
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(7):
            w, h = SIZES[k % len(SIZES)]
            (root / name / f"{i:02d}.jpg").write_bytes(_jpeg(_image(w, h, c, k)))
            k += 1
    Image.fromarray(_image(45, 31, 2, 99)).save(root / "cow" / "extra.PNG")
    (root / "bee" / "zz_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"this is not a jpeg" * 20)
    (root / "ant" / "notes.txt").write_text("not an image")
    return str(root)


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory):
    """The same files as webdataset shards, in the folder source's index order (so indices coincide)."""
    src = D.FolderSource(folder)
    out = tmp_path_factory.mktemp("wds")
    paths = []
    for s in range(2):
        path = str(out / f"shard-{s:03d}.tar")
        with tarfile.open(path, "w") as tf:
            for i in range(s * 12, min(len(src), (s + 1) * 12)):
                ext = os.path.splitext(src.paths[i])[1].lower().lstrip(".")
                for name, payload in ((f"{i:06d}.{ext}", src.read_bytes(i)),
                                      (f"{i:06d}.cls", str(int(src.labels[i])).encode())):
                    ti = tarfile.TarInfo(name)
                    ti.size = len(payload)
                    tf.addfile(ti, io.BytesIO(payload))
        paths.append(path)
    return paths


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb)
        assert torch.equal(xa, xb)


def _indexed_arrays(n, size=8):
    """ArraySource whose image i carries i in pixel (0, 0, R) and i // 256 in (0, 0, G)."""
    imgs = np.random.default_rng(n).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    imgs[:, 0, 0, 0] = np.arange(n) % 256
    imgs[:, 0, 0, 1] = np.arange(n) // 256
    return ArraySource(imgs, np.arange(n) % 5)


def _decode_idx(x):
    px = torch.round((x[:, :, 0, 0] + 1) * 127.5).long()
    return (px[:, 0] + 256 * px[:, 1]).tolist()


# ------------------------------------------------------------------------------------------- contract

@pytest.mark.parametrize("loader", FILE_LOADERS)
def test_shapes_range_and_labels(folder, loader):
    ld = make_loader(folder, S, 4, loader=loader, num_workers=2)
    assert ld.backend == loader
    assert ld.num_samples == 23 and ld.num_classes == 3 and ld.classes == CLASSES
    for x, y in _take(ld, 7):
        assert x.shape == (4, 3, S, S) and x.dtype == torch.float32 and x.device.type == "cpu"
        assert y.shape == (4,) and y.dtype == torch.int64
        assert x.min() >= -1 and x.max() <= 1
        blue = (x[:, 2].mean(dim=(1, 2)) + 1) * 127.5
        assert torch.allclose(blue, torch.tensor([_blue(c) for c in y.tolist()], dtype=torch.float32), atol=6)
    assert ld.skipped >= 1          # 7 batches cover 28 > 23 positions: the corrupt file was met


def test_memory_loader_and_auto(folder):
    src = _indexed_arrays(40)
    ld = make_loader(src, 8, 5)
    assert ld.backend == "memory"
    x, y = next(ld)
    assert x.shape == (5, 3, 8, 8) and y.dtype == torch.int64
    assert y.tolist() == [i % 5 for i in _decode_idx(x)]
    assert make_loader(folder, S, 2).backend == ("dali" if HAVE_DALI else "torch")


def test_float_arrays_are_quantised():
    imgs = np.random.default_rng(0).random((6, 8, 8, 3)).astype(np.float32)
    src = ArraySource(imgs, np.zeros(6, np.int64))
    assert src.images.dtype == np.uint8
    assert np.array_equal(src.images, np.rint(imgs.astype(np.float64) * 255).astype(np.uint8))
    ld = make_loader(ArraySource(imgs * 2 - 1, np.zeros(6, np.int64), value_range=(-1, 1)), 8, 2)
    assert next(ld)[0].abs().max() <= 1


# ------------------------------------------------------------------------------------------- sharding / order

def test_rank_shards_are_disjoint_and_cover_the_data():
    n, B, world = 37, 3, 3
    src = _indexed_arrays(n)
    per_rank = (n // (B * world)) * B                         # 12: drop_last keeps 36 of 37
    seen = []
    for r in range(world):
        ld = make_loader(src, 8, B, rank=r, world_size=world, seed=5)
        got = [i for x, _ in _take(ld, per_rank // B) for i in _decode_idx(x)]
        assert got == ld.indices(0).tolist()                  # the loader reads what indices() says
        perm = D.epoch_permutation(5, 0, n).tolist()
        assert got == perm[r:world * per_rank:world]          # rank r takes positions r::world
        seen.append(set(got))
        assert _decode_idx(next(ld)[0]) == ld.indices(1)[:B].tolist()    # then epoch 1 begins
    assert all(not (seen[a] & seen[b]) for a in range(world) for b in range(a + 1, world))
    assert len(set.union(*seen)) == world * per_rank
    # drop_last=False pads from the permutation's start: every sample is read each epoch
    allidx = set()
    for r in range(world):
        ld = make_loader(src, 8, B, rank=r, world_size=world, seed=5, drop_last=False)
        assert len(ld.indices(0)) == 15
        allidx |= set(ld.indices(0).tolist())
    assert allidx == set(range(n))


def test_folder_shards_disjoint(folder):
    a = make_loader(folder, S, 2, rank=0, world_size=2, loader="torch")
    b = make_loader(folder, S, 2, rank=1, world_size=2, loader="torch")
    ia, ib = set(a.indices(3).tolist()), set(b.indices(3).tolist())
    assert not ia & ib and len(ia | ib) == (23 // 4) * 4


def test_epoch_permutation_deterministic_and_seeded():
    p = D.epoch_permutation(1, 0, 100)
    assert sorted(p.tolist()) == list(range(100))
    assert torch.equal(p, D.epoch_permutation(1, 0, 100))
    assert not torch.equal(p, D.epoch_permutation(1, 1, 100))
    assert not torch.equal(p, D.epoch_permutation(2, 0, 100))


@pytest.mark.parametrize("loader", FILE_LOADERS)
def test_deterministic_and_worker_count_independent(folder, loader):
    kw = dict(loader=loader, augment="random_crop_flip", seed=3)
    a = _take(make_loader(folder, S, 3, num_workers=2, **kw), 9)
    b = _take(make_loader(folder, S, 3, num_workers=0 if loader == "torch" else 1, **kw), 9)
    _same(a, b)
    c = _take(make_loader(folder, S, 3, num_workers=2, loader=loader, augment="random_crop_flip", seed=4), 9)
    assert any(not torch.equal(x[1], y[1]) or not torch.equal(x[0], y[0]) for x, y in zip(a, c))


def test_augmentation_independent_of_rank_count():
    """A sample's crop and flip depend on (seed, epoch, index) only, not on which rank reads it."""
    imgs = np.random.default_rng(1).integers(0, 256, (24, 23, 29, 3), dtype=np.uint8)
    src = ArraySource(imgs, np.zeros(24, np.int64))

    def by_index(world, rank):
        ld = make_loader(src, 12, 4, rank=rank, world_size=world, seed=9, augment="random_crop_flip")
        idx = ld.indices(0)
        xs = torch.cat([x for x, _ in _take(ld, len(idx) // 4)])
        return dict(zip(idx.tolist(), xs))

    one = by_index(1, 0)
    two = {**by_index(2, 0), **by_index(2, 1)}
    assert set(one) == set(two) == set(range(24))
    assert all(torch.equal(one[i], two[i]) for i in one)
    flips = sum(plan_crop(29, 23, 12, "random_crop_flip", False, D.sample_uniforms(9, 0, i)).flip
                for i in range(24))
    assert 0 < flips < 24


# ------------------------------------------------------------------------------------------- resume

@pytest.mark.parametrize("loader", FILE_LOADERS + ["memory"])
def test_resume_continues_exactly(folder, loader):
    kw = dict(loader=loader, seed=11, augment="random_crop_flip")
    src = "digits" if loader == "memory" else folder
    size = 32 if loader == "memory" else S
    ld = make_loader(src, size, 5, **kw)
    b1 = next(ld)
    sd = ld.state_dict()
    assert sd["epoch"] == 0 and sd["index"] == 5 + ld.skipped and sd["seed"] == 11
    rest = _take(ld, 4)                                       # crosses into epoch 1 for the 23-file folder
    ld2 = make_loader(src, size, 5, **kw)
    ld2.load_state_dict(sd)
    _same(rest, _take(ld2, 4))
    assert ld2.state_dict() == ld.state_dict()
    # load_state_dict on a used loader rewinds it too
    ld.load_state_dict(sd)
    _same(rest[:2], _take(ld, 2))
    del b1


def test_resume_after_corrupt_sample(folder):
    ld = make_loader(folder, S, 4, loader="torch", seed=2)
    bad = D.FolderSource(folder).paths.index(os.path.join(folder, "bee", "zz_corrupt.jpg"))
    pos = ld.indices(0).tolist().index(bad)
    states, batches = [], []
    for _ in range(6):
        states.append(ld.state_dict())
        batches.append(next(ld))
    assert ld.skipped == 1
    for k in (0, pos // 4, pos // 4 + 1):
        ld2 = make_loader(folder, S, 4, loader="torch", seed=2)
        ld2.load_state_dict(states[k])
        _same(batches[k:], _take(ld2, 6 - k))
        assert ld2.skipped == 1


def test_state_mismatch_is_refused(folder):
    sd = make_loader(folder, S, 2, loader="torch", seed=1).state_dict()
    with pytest.raises(ValueError, match="seed=1"):
        make_loader(folder, S, 2, loader="torch", seed=2).load_state_dict(sd)
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(folder, S, 4, loader="torch", seed=1).load_state_dict(sd)


# ------------------------------------------------------------------------------------------- backends agree

@needs_dali
@pytest.mark.parametrize("augment,flip", [("center", False), ("center", True), ("random_crop_flip", False)])
def test_dali_matches_torch(folder, augment, flip):
    """Same samples, order, crops and flips; pixels differ by resampling only (one antialiased-cubic step in
    DALI instead of BOX halving + bicubic)."""
    kw = dict(augment=augment, flip=flip, seed=7)
    t = _take(make_loader(folder, S, 4, loader="torch", **kw), 6)
    d = _take(make_loader(folder, S, 4, loader="dali", **kw), 6)
    for (xt, yt), (xd, yd) in zip(t, d):
        assert torch.equal(yt, yd)
        diff = (xt - xd).abs() * 127.5
        assert diff.mean() < 4 and torch.quantile(diff.flatten(), 0.99) < 30   # a wrong crop/flip gives ~60+


def _times_read(loader, idx):
    """How often dataset index ``idx`` was among the positions ``loader`` has consumed."""
    sd = loader.state_dict()
    read = [loader.indices(e) for e in range(sd["epoch"])] + [loader.indices(sd["epoch"])[:sd["index"]]]
    return int(sum((r == idx).sum() for r in read))


@pytest.mark.parametrize("loader", FILE_LOADERS)
def test_truncated_jpeg_is_skipped(folder, tmp_path, loader):
    """A valid header with a cut body: the host check passes it; DALI raises and the PIL fallback drops it."""
    root = tmp_path / "t"
    for c, name in enumerate(CLASSES[:2]):
        (root / name).mkdir(parents=True)
        for i in range(5):
            (root / name / f"{i}.jpg").write_bytes(_jpeg(_image(40 + i, 30, c, i)))
    full = _jpeg(_image(60, 60, 0, 7))
    (root / "ant" / "cut.jpg").write_bytes(full[:len(full) // 2])              # header intact, scan data cut
    ld = make_loader(str(root), S, 4, loader=loader, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = _take(ld, 6)                               # 24 samples > 11 positions: two epochs
    if loader == "dali":                                     # the fallback ran, not the host-side check
        assert any("decoded the" in str(w.message) and "with PIL" in str(w.message) for w in caught)
    assert ld.skipped == _times_read(ld, D.FolderSource(str(root)).paths.index(str(root / "ant" / "cut.jpg"))) > 0
    assert all(x.shape == (4, 3, S, S) for x, _ in batches)
    if loader == "dali":
        ref = _take(make_loader(str(root), S, 4, loader="torch", seed=0, num_workers=0), 6)
        assert all(torch.equal(a[1], b[1]) for a, b in zip(ref, batches))


@needs_dali
def test_broken_dali_setup_fails_loudly(tmp_path, monkeypatch):
    """A pipeline that fails on images PIL decodes fine is a set-up problem: an error, not a silent fallback."""
    (tmp_path / "a").mkdir()
    for i in range(4):
        (tmp_path / "a" / f"{i}.jpg").write_bytes(_jpeg(_image(30, 20, 0, i)))

    class Broken:
        def __init__(self, stream, inflight):
            self.stream, self.inflight = stream, inflight

        def run(self):
            self.inflight.append((next(self.stream), None))
            raise RuntimeError("nvjpeg: no device")

    monkeypatch.setattr(dali_backend, "_dali_pipeline", lambda stream, inflight, *a: (Broken(stream, inflight), []))
    with pytest.raises(RuntimeError, match="fails on images that PIL decodes.*nvjpeg: no device"):
        next(make_loader(str(tmp_path), S, 2, loader="dali"))


@pytest.mark.slow     # ~15 s per loader on 2 busy cores
@pytest.mark.parametrize("loader", FILE_LOADERS)
def test_webdataset_shards_match_folder(folder, shards, loader):
    tar = make_loader(shards, S, 4, loader=loader, seed=1)
    assert tar.num_samples == 23 and tar.num_classes == 3
    _same(_take(make_loader(folder, S, 4, loader=loader, seed=1), 5), _take(tar, 5))
    assert tar.skipped == 1
    # a directory of shards and a brace pattern name the same data
    d = os.path.dirname(shards[0])
    for src in (d, os.path.join(d, "shard-{000..001}.tar")):
        assert D.open_source(src).shards == shards


def test_webdataset_labels(tmp_path):
    def shard(path, members):
        with tarfile.open(path, "w") as tf:
            for name, payload in members:
                ti = tarfile.TarInfo(name)
                ti.size = len(payload)
                tf.addfile(ti, io.BytesIO(payload))

    img = _jpeg(_image(20, 20, 0, 0))
    shard(tmp_path / "a.tar", [("x/1.jpg", img), ("x/1.json", b'{"label": 4}'),
                               ("x/2.png", img), ("x/2.cls", b"2\n"), ("x/3.txt", b"orphan label")])
    src = D.TarSource([str(tmp_path / "a.tar")])
    assert src.labels.tolist() == [4, 2] and src.classes == [str(i) for i in range(5)]
    shard(tmp_path / "b.tar", [("1.webp", img), ("1.txt", b"zebra"), ("2.jpeg", img), ("2.txt", b"ape")])
    src = D.TarSource([str(tmp_path / "b.tar")])
    assert src.classes == ["ape", "zebra"] and src.labels.tolist() == [1, 0]
    shard(tmp_path / "c.tar", [("1.jpg", img), ("2.jpg", img)])
    assert D.TarSource([str(tmp_path / "c.tar")]).labels.tolist() == [0, 0]


# ------------------------------------------------------------------------------------------- one ordered pass

def _pass(ld):
    """Run one pass: (images, labels, indices) concatenated, and the batch sizes."""
    batches = list(ld)
    for x, y, i in batches:
        assert x.dtype == torch.float32 and x.shape[1:] == (3, ld.image_size, ld.image_size), x.shape
        assert y.dtype == torch.int64 and i.dtype == torch.int64 and len(y) == len(i) == len(x)
        assert x.min() >= -1 and x.max() <= 1
    if not batches:
        return torch.zeros(0, 3, ld.image_size, ld.image_size), torch.zeros(0, dtype=torch.int64), [], []
    x, y, i = (torch.cat(t) for t in zip(*batches))
    return x, y, i.tolist(), [len(b[2]) for b in batches]


@pytest.mark.slow     # two ranks' loaders: ~40 s on 2 busy cores
@pytest.mark.parametrize("loader", FILE_LOADERS)
def test_ordered_pass_two_ranks_cover_every_index_once(folder, loader):
    """2 simulated ranks: contiguous blocks, increasing indices, each decodable index exactly once, batches of B
    but the last, the corrupt file counted (and listed) by the rank that holds it; ADM centre crop, no
    augmentation: torch equals the PIL reference exactly, DALI within resampling rounding."""
    src = D.FolderSource(folder)
    n, B = len(src), 5
    bad = src.paths.index(os.path.join(folder, "bee", "zz_corrupt.jpg"))
    seen, corrupt = [], []
    for r in range(2):
        ld = make_ordered_loader(folder, S, B, rank=r, world_size=2, loader=loader, num_workers=2)
        assert ld.backend == loader and ld.num_samples == n == 23
        lo, hi = D.shard_bounds(n, r, 2)
        assert ld.indices.tolist() == list(range(lo, hi)), f"rank {r} block {ld.indices.tolist()} != [{lo}, {hi})"
        x, y, idx, sizes = _pass(ld)
        assert idx == sorted(set(idx)) and all(lo <= i < hi for i in idx), f"rank {r}: indices {idx}"
        assert sizes[:-1] == [B] * (len(sizes) - 1) and 1 <= sizes[-1] <= B, f"rank {r}: batch sizes {sizes}"
        assert ld.skipped == len(ld.corrupt) == (1 if lo <= bad < hi else 0)
        assert sorted(idx + ld.corrupt) == list(range(lo, hi)), f"rank {r}: {idx} + corrupt {ld.corrupt}"
        assert y.tolist() == src.labels[idx].tolist()
        ref = torch.stack([torch.from_numpy(_center_crop_arr(src.load(i), S)).permute(2, 0, 1) for i in idx])
        diff = (x - (ref.float() / 127.5 - 1)).abs() * 127.5
        if loader == "torch":
            assert diff.max() < 1e-3, f"torch ordered pass differs from the PIL reference by {diff.max():.3f} levels"
        else:
            per_image = diff.mean(dim=(1, 2, 3))
            assert per_image.max() < 4, f"DALI image too far from its PIL reference: {per_image.tolist()}"
        seen += idx
        corrupt += ld.corrupt
        assert len(list(ld)) == len(sizes) and ld.skipped == len(ld.corrupt)   # a second pass starts afresh
    assert len(seen) == len(set(seen)) and sorted(seen + corrupt) == list(range(n))
    assert corrupt == [bad]


@pytest.mark.parametrize("loader", FILE_LOADERS)
def test_ordered_pass_flip_mirrors_every_image(folder, loader):
    x, y, idx, _ = _pass(make_ordered_loader(folder, 11, 4, loader=loader, num_workers=1))
    xf, yf, idxf, _ = _pass(make_ordered_loader(folder, 11, 4, loader=loader, num_workers=1, flip=True))
    assert idx == idxf and torch.equal(y, yf)
    assert torch.equal(xf, x.flip(-1)), f"flip=True is not the mirror: max diff {(xf - x.flip(-1)).abs().max()}"


@pytest.mark.slow     # ~17 s per loader on 2 busy cores
@pytest.mark.parametrize("loader", FILE_LOADERS)
def test_ordered_pass_corrupt_tail_and_truncated_body(tmp_path, loader):
    """Unreadable files closing the pass (a last chunk with no readable image at all) and a JPEG whose header
    parses but whose body is cut (DALI raises; the in-flight batches are decoded with PIL) are skipped and
    listed; every other index comes once, in order."""
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    root = tmp_path / "tail"
    (root / "a").mkdir(parents=True)
    for i in range(4):
        w, h = (int(v) for v in rng.integers(17, 61, 2))
        (root / "a" / f"{i}.jpg").write_bytes(_jpeg(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    (root / "a" / "x_bad.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(rng.integers(0, 256, 50, dtype=np.uint8)))
    (root / "a" / "y_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 7)
    for B in (2, 3, 4, 7):                  # the bad pair fills the last chunk (B = 2, 4) or shares it
        ld = make_ordered_loader(str(root), 13, B, loader=loader, num_workers=1)
        _, _, idx, sizes = _pass(ld)
        assert idx == [0, 1, 2, 3] and ld.corrupt == [4, 5] and ld.skipped == 2, (B, idx, ld.corrupt)
        assert sizes == [min(B, 4 - k) for k in range(0, 4, B)], (B, sizes)
    # a truncated JPEG in the middle, in a second class
    (root / "b").mkdir()
    for i in range(5):
        w, h = (int(v) for v in rng.integers(17, 61, 2))
        (root / "b" / f"{i}.jpg").write_bytes(_jpeg(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    full = _jpeg(rng.integers(0, 256, (45, 39, 3), dtype=np.uint8))
    (root / "b" / "2_cut.jpg").write_bytes(full[:len(full) // 2])
    src = D.FolderSource(str(root))
    cut = src.paths.index(str(root / "b" / "2_cut.jpg"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ld = make_ordered_loader(str(root), 13, 3, loader=loader, num_workers=1)
        x, y, idx, _ = _pass(ld)
    if loader == "dali":
        assert any("with PIL" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert ld.corrupt == [4, 5, cut] and idx == [i for i in range(len(src)) if i not in (4, 5, cut)]
    assert y.tolist() == src.labels[idx].tolist()


def test_ordered_pass_memory_three_ranks():
    """In-memory arrays: each image's pixels carry its index, so images, labels and indices must agree."""
    n = int(torch.randint(30, 60, ()))
    src = _indexed_arrays(n)
    got = []
    for r in range(3):
        ld = make_ordered_loader(src, 8, 4, rank=r, world_size=3)
        assert ld.backend == "memory"
        x, y, idx, sizes = _pass(ld)
        assert _decode_idx(x) == idx == list(range(*D.shard_bounds(n, r, 3)))
        assert y.tolist() == [i % 5 for i in idx] and ld.skipped == 0
        xf = _pass(make_ordered_loader(src, 8, 4, rank=r, world_size=3, flip=True))[0]
        assert torch.equal(xf, x.flip(-1))
        got += idx
    assert got == list(range(n))
    # not S x S: the PIL centre crop, as the torch loader does it
    imgs = np.random.default_rng(n).integers(0, 256, (n, 23, 29, 3), dtype=np.uint8)
    a = _pass(make_ordered_loader(ArraySource(imgs, np.zeros(n, np.int64)), 12, 5))
    t = _pass(make_ordered_loader(ArraySource(imgs, np.zeros(n, np.int64)), 12, 5, loader="torch", num_workers=0))
    assert torch.equal(a[0], t[0]) and a[2] == t[2] == list(range(n))
    assert torch.equal(a[0][3], torch.from_numpy(_center_crop_arr(Image.fromarray(imgs[3]), 12)).permute(2, 0, 1)
                       .float() / 127.5 - 1)


def test_ordered_pass_more_ranks_than_images_and_errors(folder):
    src = _indexed_arrays(3)
    sizes = [len(make_ordered_loader(src, 8, 2, rank=r, world_size=5).indices) for r in range(5)]
    assert sizes == [0, 1, 0, 1, 1] and list(make_ordered_loader(src, 8, 2, rank=0, world_size=5)) == []
    with pytest.raises(ValueError, match="rank 2 is out of range"):
        make_ordered_loader(folder, S, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="unknown loader 'fast'"):
        make_ordered_loader(folder, S, 2, loader="fast")
    with pytest.raises(ValueError, match="batch_size"):
        make_ordered_loader(folder, S, 0)
    with pytest.raises(ValueError, match="loader='memory'"):
        make_ordered_loader(folder, S, 2, loader="memory")
    if HAVE_DALI:
        with pytest.raises(ValueError, match="loader='memory'"):
            make_ordered_loader(src, 8, 2, loader="dali")
        assert make_ordered_loader(folder, S, 2).backend == "dali"


# ------------------------------------------------------------------------------------------- the recipe itself

def _center_crop_arr(pil_image, image_size):
    """ADM / LlamaGen center_crop_arr, verbatim."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


def _random_crop_arr(pil_image, image_size, rnd, min_crop_frac=0.8, max_crop_frac=1.0):
    """LlamaGen random_crop_arr, verbatim but for the random module passed in."""
    min_smaller_dim_size = math.ceil(image_size / max_crop_frac)
    max_smaller_dim_size = math.ceil(image_size / min_crop_frac)
    smaller_dim_size = rnd.randrange(min_smaller_dim_size, max_smaller_dim_size + 1)
    while min(*pil_image.size) >= 2 * smaller_dim_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = smaller_dim_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = rnd.randrange(arr.shape[0] - image_size + 1)
    crop_x = rnd.randrange(arr.shape[1] - image_size + 1)
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size], (smaller_dim_size, crop_y, crop_x)


@pytest.mark.parametrize("w,h,size", [(50, 37, 16), (37, 50, 16), (500, 375, 64), (1001, 751, 96), (13, 9, 16),
                                      (256, 256, 256), (300, 1200, 32)])
def test_center_plan_equals_adm_center_crop(w, h, size):
    img = Image.fromarray(np.random.default_rng(w * h).integers(0, 256, (h, w, 3), dtype=np.uint8))
    plan = plan_crop(w, h, size, "center", False, [0.5] * 4)
    assert np.array_equal(apply_plan(img, plan), _center_crop_arr(img, size))


@pytest.mark.parametrize("w,h,size", [(50, 37, 16), (500, 375, 64), (33, 70, 16), (641, 480, 256)])
def test_random_plan_equals_llamagen_random_crop(w, h, size):
    img = Image.fromarray(np.random.default_rng(w + h).integers(0, 256, (h, w, 3), dtype=np.uint8))
    rnd = random.Random(w * 7 + h)
    for _ in range(5):
        ref, (T, y, x) = _random_crop_arr(img, size, rnd)
        lo, hi = math.ceil(size / 1.0), math.ceil(size / 0.8)
        # Uniforms that select the same draws: T, then the crop offsets over the resized size.
        u0 = (T - lo + 0.5) / (hi - lo + 1)
        rw, rh = plan_crop(w, h, size, "random_crop_flip", False, [u0, 0, 0, 1]).size
        plan = plan_crop(w, h, size, "random_crop_flip", False,
                         [u0, (y + 0.5) / (rh - size + 1), (x + 0.5) / (rw - size + 1), 0.9])
        assert plan.offset == (x, y) and not plan.flip
        assert np.array_equal(apply_plan(img, plan), ref)


def test_random_short_side_covers_its_range():
    sides = {min(plan_crop(100, 80, 32, "random_crop_flip", False, D.sample_uniforms(0, 0, i)).size)
             for i in range(400)}
    assert sides == set(range(32, 41))                           # [ceil(32/1.0), ceil(32/0.8)]


# ------------------------------------------------------------------------------------------- digits

def test_digits_arrays():
    images, labels = load_digits_arrays()
    assert images.shape == (1797, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (1797,) and labels.dtype == np.int64 and set(labels.tolist()) == set(range(10))
    assert images.min() == 0 and images.max() == 255
    assert set(np.unique(images).tolist()) <= {round(v * 255 / 16) for v in range(17)}
    assert (images[..., 0] == images[..., 1]).all() and (images[..., 1] == images[..., 2]).all()
    blocks = images[..., 0].reshape(1797, 8, 4, 8, 4)
    assert (blocks == blocks[:, :, :1, :, :1]).all()             # 4x nearest-neighbour
    from sklearn.datasets import load_digits
    raw = load_digits().images
    assert np.array_equal(blocks[:, :, 0, :, 0], np.rint(raw * 255 / 16).astype(np.uint8))
    # ink bright on black: the side columns are background, the centre carries the strokes
    assert images[:, :, :4, 0].mean() < 5 and images[:, :, -4:, 0].mean() < 5
    assert images[:, 8:24, 8:24, 0].mean() > 60 and np.median(images) > 0 and (images == 0).mean() > 0.4


def test_digits_split():
    (ti, tl), (hi, hl) = digits_split(0.1, seed=0)
    assert len(tl) + len(hl) == 1797 and 170 <= len(hl) <= 190
    assert set(hl.tolist()) == set(range(10))
    (ti2, _), (hi2, _) = digits_split(0.1, seed=0)
    assert np.array_equal(hi, hi2) and np.array_equal(ti, ti2)
    (_, _), (hi3, _) = digits_split(0.1, seed=1)
    assert not np.array_equal(hi, hi3)
    all_imgs = load_digits_arrays()[0].reshape(1797, -1)
    rows = {r.tobytes() for r in all_imgs}
    assert all(r.tobytes() in rows for r in hi.reshape(len(hi), -1))


def test_digits_loader():
    ld = make_loader("digits", 32, 16, seed=0)
    assert ld.num_samples == 1797 and ld.num_classes == 10
    x, y = next(ld)
    assert x.shape == (16, 3, 32, 32) and x.min() == -1 and x.max() <= 1
    assert make_loader("digits:holdout", 32, 8).num_samples == len(digits_split()[1][1])


# ------------------------------------------------------------------------------------------- errors

def test_split_global_batch():
    assert split_global_batch(256, 8) == 32
    with pytest.raises(ValueError, match="not divisible by the world size 3"):
        split_global_batch(256, 3)
    with pytest.raises(ValueError, match="positive"):
        split_global_batch(0, 1)


def test_error_cases(folder, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not found"):
        make_loader(str(tmp_path / "nope"), S, 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        make_loader(str(tmp_path / "empty"), S, 2)
    (tmp_path / "loose").mkdir()
    Image.fromarray(_image(9, 9, 0, 0)).save(tmp_path / "loose" / "a.png")
    with pytest.raises(ValueError, match="no class sub-directories"):
        make_loader(str(tmp_path / "loose"), S, 2)
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "a" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        make_loader(str(tmp_path / "noimg"), S, 2)
    with pytest.raises(ValueError, match="unknown loader 'fast'"):
        make_loader(folder, S, 2, loader="fast")
    with pytest.raises(ValueError, match="unknown augment"):
        make_loader(folder, S, 2, augment="jitter")
    with pytest.raises(ValueError, match="fewer than one global batch"):
        make_loader(folder, S, 8, world_size=4)
    with pytest.raises(ValueError, match="rank 2 is out of range"):
        make_loader(folder, S, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="loader='memory'"):
        make_loader(folder, S, 2, loader="memory")
    with pytest.raises(ValueError, match="channels-last"):
        ArraySource(np.zeros((4, 3, 8, 8), np.uint8), np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="no images"):
        D.TarSource([str(_empty_tar(tmp_path))])
    gz = tmp_path / "x.tar"
    with tarfile.open(gz, "w:gz") as tf:
        tf.addfile(tarfile.TarInfo("a.txt"), io.BytesIO(b""))
    with pytest.raises(ValueError, match="uncompressed tar"):
        make_loader(str(gz), S, 2)

    def denied(path):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(os, "scandir", denied)
    with pytest.raises(PermissionError, match="cannot read data directory"):
        make_loader(folder, S, 2, loader="torch")


def _empty_tar(tmp_path):
    p = tmp_path / "empty.tar"
    with tarfile.open(p, "w") as tf:
        ti = tarfile.TarInfo("1.cls")
        ti.size = 1
        tf.addfile(ti, io.BytesIO(b"1"))
    return p


def test_dali_missing_names_the_package(folder, monkeypatch):
    monkeypatch.setattr(dali_backend, "dali_available", lambda: False)
    with pytest.raises(ImportError, match=D.DALI_PIP_PACKAGE):
        make_loader(folder, S, 2, loader="dali")
    assert make_loader(folder, S, 2, loader="auto").backend == "torch"


@needs_dali
def test_dali_refuses_arrays():
    with pytest.raises(ValueError, match="loader='memory'"):
        make_loader(_indexed_arrays(8), 8, 2, loader="dali")


def test_dali_required_in_ci():
    """CI sets DAR_FAST_REQUIRE_DALI=1: there the DALI tests must run, not skip."""
    if os.environ.get("DAR_FAST_REQUIRE_DALI") == "1":
        assert HAVE_DALI, f"DAR_FAST_REQUIRE_DALI=1 but nvidia-dali is not importable: pip install {D.DALI_PIP_PACKAGE}"
    else:
        pytest.skip("DAR_FAST_REQUIRE_DALI is not set")
