"""extract-codes: the stored codes equal tok.encode (with and without flips), labels, corrupt files, layout."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dar_fast.api import save_tokenizer
from dar_fast.cli import main
from dar_fast.config import ARConfig
from dar_fast.training.ar_train import CodeSet
from dar_fast.training.data import ArraySource, apply_plan, open_source, plan_crop
from dar_fast.training.extract_codes import code_dtype, extract_codes

from helpers import tiny_tokenizer



pytestmark = pytest.mark.usefixtures("one_thread")


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
    assert main(["extract-codes", "--tokenizer", path, "--data", str(folder), "--out", str(out), "--flip",
                 "--batch-size", "3", "--num-workers", "0"]) == 0
    meta = json.loads((out / "meta.json").read_text())
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
    assert main(["extract-codes", "--tokenizer", path, "--data", str(folder), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["extract-codes", "--tokenizer", path, "--data", str(folder), "--out", str(out), "--overwrite",
                 "--num-workers", "0", "--quiet"]) == 0
    assert np.load(out / "codes.npy").shape == (M, 1, 16)


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
    assert main(["extract-codes", "--tokenizer", path, "--data", str(tmp_path / "none"), "--out",
                 str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["extract-codes", "--tokenizer", str(tmp_path / "no.safetensors"), "--data", "digits", "--out",
                 str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
