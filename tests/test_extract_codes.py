"""extract-codes: the stored codes equal tok.encode (with and without flips) of the images the loader yields (PIL
for torch, DALI's own resize for dali), labels, corrupt files, layout."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dar_fast.api import save_tokenizer
from dar_fast.cli import main
from dar_fast.config import ARConfig
from dar_fast.training.data import CodeSet
from dar_fast.training.data import (DALI_PIP_PACKAGE, ArraySource, apply_plan, dali_available,
                                    make_ordered_loader, open_source, plan_crop)
from dar_fast.training.extract_codes import code_dtype, extract_codes

from helpers import tiny_tokenizer



pytestmark = pytest.mark.usefixtures("one_thread")
needs_dali = pytest.mark.skipif(not dali_available(),
                                reason=f"nvidia-dali not importable (pip install {DALI_PIP_PACKAGE})")


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory):
    tok = tiny_tokenizer(seed=5)
    p = tmp_path_factory.mktemp("tok") / "tok.safetensors"
    save_tokenizer(tok, str(p))
    return str(p), tok


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two classes of PNGs of several sizes (centre-cropped to 32) and one corrupt file."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    sizes = [(32, 32), (40, 48), (64, 36), (33, 32), (32, 32)]
    for c in ("cat", "dog"):
        (root / c).mkdir()
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    (root / "dog" / "9_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return root


def _centre(img: Image.Image) -> torch.Tensor:
    arr = apply_plan(img, plan_crop(img.size[0], img.size[1], 32, "center", False, (0.5,) * 4))
    return torch.from_numpy(np.array(arr)).permute(2, 0, 1).float() / 127.5 - 1


def test_codes_equal_encode_with_flips(tok_file, folder, tmp_path, capsys):
    path, tok = tok_file
    out = tmp_path / "codes"
    assert main(["extract-codes", "--device", "cpu", "--tokenizer", path, "--data", str(folder), "--out", str(out), "--flip",
                 "--batch-size", "3", "--num-workers", "0", "--loader", "torch"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["loader"] == "torch"
    codes = np.load(out / "codes.npy", mmap_mode="r")
    labels = np.load(out / "labels.npy")
    src = open_source(str(folder))
    M = len(src)
    assert codes.shape == (M, 2, 16) and codes.dtype == np.int16
    assert meta["num_images"] == M == 11 and meta["skipped"] == 1 and meta["num_aug"] == 2
    assert meta["codebook_size"] == 32 and meta["num_tokens"] == 16
    assert not list(out.glob("*.partial")) and not list(out.glob("*.tmp"))
    good = [i for i in range(M) if labels[i] >= 0]
    assert len(good) == 10 and all(labels[i] == src.labels[i] for i in good)
    assert not codes[[i for i in range(M) if i not in good]].any()          # the corrupt row: label -1, codes 0
    x = torch.stack([_centre(src.load(i)) for i in good])
    want = tok.encode(x)
    want_flip = tok.encode(x.flip(-1))
    assert torch.equal(torch.from_numpy(codes[good, 0].astype(np.int64)), want)
    assert torch.equal(torch.from_numpy(codes[good, 1].astype(np.int64)), want_flip)
    assert meta["code_min"] == int(torch.cat([want, want_flip]).min())
    assert meta["code_max"] == int(torch.cat([want, want_flip]).max())
    # the AR trainer opens it and skips the corrupt row
    cs = CodeSet(str(out))
    assert cs.num_samples == 10
    cs.check(ARConfig(dim=64, n_layer=1, n_head=1, vocab_size=32, block_size=16, num_classes=2))
    # an existing code set is not overwritten by accident
    capsys.readouterr()
    assert main(["extract-codes", "--device", "cpu", "--tokenizer", path, "--data", str(folder), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["extract-codes", "--device", "cpu", "--tokenizer", path, "--data", str(folder), "--out", str(out), "--overwrite",
                 "--num-workers", "0", "--quiet", "--loader", "torch"]) == 0
    assert np.load(out / "codes.npy").shape == (M, 1, 16)
    assert np.array_equal(np.load(out / "codes.npy")[:, 0], codes[:, 0])


def _random_folder(root, rng):
    """Two classes of random PNGs and JPEGs of odd sizes (some >= 2x the crop, so PIL halves them first), a
    file with a broken header and a JPEG cut in half (its header parses: DALI itself must fail on it). The images
    are smooth (a random 3..8 px field, upsampled, plus +-6 of noise), like photos: on white noise the two
    resize recipes differ by ~5 levels instead of ~1."""
    for c in ("ant", "bee"):
        (root / c).mkdir(parents=True)
        for i in range(int(rng.integers(4, 8))):
            w, h = (int(v) for v in rng.integers(29, 97, 2))
            field = Image.fromarray(rng.integers(0, 256, (*rng.integers(3, 9, 2), 3), dtype=np.uint8))
            a = np.asarray(field.resize((w, h), Image.BICUBIC)).astype(np.int16) + rng.integers(-6, 7, (h, w, 3))
            img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
            img.save(root / c / (f"{i}.png" if i % 2 else f"{i}.jpg"), **({} if i % 2 else {"quality": 90}))
    (root / "ant" / "3_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (51, 47, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "bee" / "1_cut.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    return root


@needs_dali
def test_dali_codes_equal_encode_of_the_dali_images(tok_file, tmp_path):
    """--loader dali (and auto, where DALI imports) stores tok.encode of the DALI-preprocessed images, which are
    ~1 grey level away from the PIL ones: the reference is the ordered DALI pass itself, encoded batch by batch."""
    path, tok = tok_file
    folder = _random_folder(tmp_path / "imgs", np.random.default_rng(int(torch.randint(0, 2**31, ()))))
    src = open_source(str(folder))
    M, B = len(src), 3
    bad = sorted(src.paths.index(str(folder / p)) for p in ("ant/3_broken.png", "bee/1_cut.jpg"))
    out = tmp_path / "dali"
    with pytest.warns(UserWarning, match="with PIL"):            # the cut JPEG: DALI fails, PIL drops it
        assert main(["extract-codes", "--device", "cpu", "--tokenizer", path, "--data", str(folder), "--out", str(out), "--flip",
                     "--batch-size", str(B), "--num-workers", "1", "--loader", "dali", "--quiet"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    codes, labels = np.load(out / "codes.npy"), np.load(out / "labels.npy")
    assert meta["loader"] == "dali" and meta["skipped"] == 2 and meta["num_images"] == M
    assert codes.shape == (M, 2, 16) and [i for i in range(M) if labels[i] < 0] == bad, labels
    assert not codes[bad].any()
    ld = make_ordered_loader(str(folder), 32, B, loader="dali", num_workers=1)
    n, max_diff = 0, 0.0
    with pytest.warns(UserWarning, match="with PIL"):
        for x, y, idx in ld:
            idx = idx.numpy()
            for a, xa in enumerate((x, x.flip(-1))):
                want = tok.encode(xa)
                got = torch.from_numpy(codes[idx, a].astype(np.int64))
                assert torch.equal(got, want), (f"aug {a}, indices {idx.tolist()}: "
                                                f"{int((got != want).sum())} of {want.numel()} codes differ")
            assert labels[idx].tolist() == y.tolist() == src.labels[idx].tolist()
            # DALI's one-step resize vs. PIL's BOX halvings + bicubic: close, not equal
            pil = torch.stack([_centre(src.load(int(i))) for i in idx])
            diff = (x - pil).abs() * 127.5
            assert diff.mean() < 3, f"DALI images {idx.tolist()} are {diff.mean():.2f} levels from PIL's"
            n, max_diff = n + len(idx), max(max_diff, float(diff.max()))
    assert n == M - 2 and ld.corrupt == bad
    assert max_diff >= 0.5, "DALI and PIL images are identical: this test no longer tells the two recipes apart"
    # auto picks DALI where it imports: the same codes (DALI is deterministic)
    with pytest.warns(UserWarning, match="with PIL"):
        assert main(["extract-codes", "--device", "cpu", "--tokenizer", path, "--data", str(folder), "--out", str(tmp_path / "auto"),
                     "--flip", "--batch-size", str(B), "--num-workers", "1", "--quiet"]) == 0
    assert json.loads((tmp_path / "auto" / "meta.json").read_text())["loader"] == "dali"
    assert np.array_equal(np.load(tmp_path / "auto" / "codes.npy"), codes)
    assert np.array_equal(np.load(tmp_path / "auto" / "labels.npy"), labels)


def test_in_memory_arrays(tok_file, tmp_path):
    _, tok = tok_file
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    meta = extract_codes(tok, ArraySource(images, np.arange(7) % 3), str(tmp_path / "c"), batch_size=4,
                         device="cpu", quiet=True)
    codes = np.load(tmp_path / "c" / "codes.npy")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.equal(torch.from_numpy(codes[:, 0].astype(np.int64)), tok.encode(x))
    assert meta["num_classes"] == 3 and list(np.load(tmp_path / "c" / "labels.npy")) == [0, 1, 2, 0, 1, 2, 0]


def test_dtype_and_errors(tok_file, tmp_path, capsys):
    assert code_dtype(256) == np.int16 and code_dtype(32768) == np.int16 and code_dtype(32769) == np.int32
    path, _ = tok_file
    capsys.readouterr()
    assert main(["extract-codes", "--device", "cpu", "--tokenizer", path, "--data", str(tmp_path / "none"), "--out",
                 str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["extract-codes", "--device", "cpu", "--tokenizer", str(tmp_path / "no.safetensors"), "--data", "digits", "--out",
                 str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
