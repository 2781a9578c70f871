"""Data folders that cannot hang or loop: FIFOs and dangling links skipped and counted, symlink loops entered once,
skipped images in metrics.jsonl, extract-codes failing on all-corrupt data."""
import json
import os
import threading

import numpy as np
import pytest
from PIL import Image

from dar_fast.api import save_tokenizer
from dar_fast.cli import main
from dar_fast.training import data as D
from dar_fast.training.loop import read_metrics
from helpers import tiny_tokenizer, tiny_tokenizer_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _png(path, seed, size=(40, 36)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _folder(root, per_class=4):
    for c, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            _png(root / name / f"{i}.png", 10 * c + i)
    return root


def _with_timeout(fn, seconds=20):
    """Run fn in a thread; fail (instead of hanging the suite) if it does not return in time."""
    box = {}

    def go():
        try:
            box["v"] = fn()
        except BaseException as e:       # noqa: BLE001  (re-raised below)
            box["e"] = e
    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still blocked after {seconds}s"
    if "e" in box:
        raise box["e"]
    return box["v"]


def test_fifo_and_dangling_link_skipped_and_counted(tmp_path):
    root = _folder(tmp_path / "d")
    os.mkfifo(root / "a" / "x.jpg")                           # a FIFO named like an image: opening it would block
    os.symlink(root / "a" / "gone.png", root / "b" / "dangling.png")
    with pytest.warns(UserWarning, match="skipped 2 image-named entries that are not regular files"):
        src = D.FolderSource(str(root))
    assert len(src.paths) == 8 and sorted(os.path.basename(p) for p in src.skipped_files) == ["dangling.png", "x.jpg"]
    with pytest.warns(UserWarning, match="skipped 2"):
        ld = D.make_loader(str(root), 32, 4, loader="torch", num_workers=0, augment="center")
    images, labels = _with_timeout(lambda: next(iter(ld)))
    assert images.shape == (4, 3, 32, 32)


def test_read_of_a_fifo_raises_instead_of_blocking(tmp_path):
    os.mkfifo(tmp_path / "late.jpg")                          # became a FIFO after the listing
    with pytest.raises(OSError, match="not a regular file"):
        _with_timeout(lambda: D.read_regular_file(str(tmp_path / "late.jpg")), 10)
    (tmp_path / "ok.png").write_bytes(b"12345")
    assert D.read_regular_file(str(tmp_path / "ok.png")) == b"12345"


def test_symlink_loop_listed_once(tmp_path):
    root = _folder(tmp_path / "d")
    os.symlink(root / "a", root / "a" / "loop")               # a/loop -> a: os.walk(followlinks) would recurse
    os.symlink(root, root / "b" / "up")                       # b/up -> the root: a cycle through both classes
    (root / "b" / "sub").mkdir()
    _png(root / "b" / "sub" / "deep.png", 99)
    src = D.FolderSource(str(root))
    assert len(src.paths) == 9, src.paths                     # 4 + 4 + 1, each once
    assert len({os.path.realpath(p) for p in src.paths}) == 9
    assert src.labels.tolist() == [0] * 4 + [1] * 5


def test_listing_order_unchanged(tmp_path):
    """Same order as the os.walk listing it replaces (a resumed run must see the same data order)."""
    root = _folder(tmp_path / "d")
    for sub in ("b-x", "b", "c"):
        (root / "a" / sub).mkdir()
        _png(root / "a" / sub / "1.png", 5)
    expect = []
    for label, d in enumerate(("a", "b")):
        for dirpath, _, files in sorted(os.walk(root / d), key=lambda t: t[0]):
            expect += [os.path.join(dirpath, f) for f in sorted(files)]
    assert D.FolderSource(str(root)).paths == expect


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("tok") / "tok.safetensors"
    save_tokenizer(tiny_tokenizer(seed=5), str(p))
    return str(p)


def test_extract_codes_fails_on_all_corrupt_data(tok_file, tmp_path, capsys):
    root = tmp_path / "bad"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            (root / c / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    out = tmp_path / "codes"
    argv = ["extract-codes", "--tokenizer", tok_file, "--data", str(root), "--out", str(out), "--loader", "torch",
            "--num-workers", "0", "--device", "cpu", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "none of the 6 images" in err and "could be decoded" in err
    assert not any(f.endswith((".npy", ".json", ".partial")) for f in os.listdir(out))


def test_skipped_images_in_metrics(tmp_path):
    root = _folder(tmp_path / "d", per_class=3)
    (root / "b" / "z_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    cfg = tmp_path / "tok.json"
    cfg.write_text(json.dumps(tiny_tokenizer_config().to_dict()))
    out = tmp_path / "run"
    argv = ["train-tokenizer", "--preset", str(cfg), "--data", str(root), "--out", str(out), "--steps", "3",
            "--batch-size", "4", "--lpips-weight", "0", "--repa-weight", "0", "--warmup", "0", "--quiet",
            "--device", "cpu", "--loader", "torch", "--num-workers", "0", "--augment", "center"]
    assert main(argv) == 0
    recs = read_metrics(str(out))
    counts = [r["skipped_images"] for r in recs]
    ld = D.make_loader(str(root), 32, 4, loader="torch", num_workers=0, augment="center", seed=0)
    expect = []
    for _ in range(3):                    # the trainer's stream: 12 good images over epochs of 7 files, 1 broken
        next(ld)
        expect.append(ld.skipped)
    assert counts == expect and counts[-1] >= 1, (counts, expect)


def test_stuck_worker_read_times_out(tmp_path, monkeypatch):
    """A read that never returns (a hung network file system) ends in an error, not a silent hang."""
    import time

    from dar_fast.training.data import sources
    root = _folder(tmp_path / "d")
    monkeypatch.setenv("DAR_FAST_READ_TIMEOUT", "2")
    monkeypatch.setattr(sources.FolderSource, "read_bytes", lambda self, idx: time.sleep(60))
    ld = D.make_loader(str(root), 32, 4, loader="torch", num_workers=1, augment="center")
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="timed out"):
        _with_timeout(lambda: next(iter(ld)), 40)
    assert time.perf_counter() - t0 < 40
    ld.close()
