"""`dar-fast sample` with given checkpoints: PNGs, grid, preview strips; bad input writes nothing."""
import numpy as np
import pytest
from PIL import Image

import dar_fast
from dar_fast.cli import main
from helpers import tiny_ar, tiny_tokenizer


def _ckpts(tmp_path):
    tok = tiny_tokenizer(seed=3)
    ar = tiny_ar(seed=4, vocab_size=tok.codebook_size, block_size=tok.num_tokens)
    dar_fast.save_tokenizer(tok, str(tmp_path / "tok.safetensors"))
    dar_fast.save_ar(ar, str(tmp_path / "ar.safetensors"))
    # --device cpu: with CUDA present the CLI would pick CUDA bf16, and "the same images at any batch size"
    # (max 1 level apart) would then test another claim than on CI
    return ["--tokenizer", str(tmp_path / "tok.safetensors"), "--ar", str(tmp_path / "ar.safetensors"),
            "--device", "cpu"]


def test_sample_writes_images_grid_and_previews(tmp_path):
    out = tmp_path / "out"
    argv = ["sample", *_ckpts(tmp_path), "--labels", "0", "3", "--per-class", "2", "--cfg", "1.1,4",
            "--batch-size", "3", "--previews", "--out", str(out), "--seed", "5"]
    assert main(argv) == 0
    files = sorted(p.name for p in out.glob("sample_*.png"))
    assert files == ["sample_00000_class0.png", "sample_00001_class0.png", "sample_00002_class3.png",
                     "sample_00003_class3.png"]
    strips = np.asarray(Image.open(out / "previews.png"))
    grid = np.asarray(Image.open(out / "grid.png"))
    assert strips.ndim == 3 and grid.ndim == 3 and strips.std() > 0
    # the same command gives the same images (keyed seeds), batch size notwithstanding
    again = tmp_path / "again"
    assert main([*argv[:-4], "--out", str(again), "--seed", "5", "--batch-size", "4"]) == 0
    for f in files:
        assert np.abs(np.asarray(Image.open(out / f)).astype(int) - np.asarray(Image.open(again / f))).max() <= 1


def test_sample_bad_input_writes_nothing(tmp_path):
    out = tmp_path / "out"
    assert main(["sample", *_ckpts(tmp_path), "--labels", "99", "--out", str(out)]) == 2
    assert main(["sample", "--tokenizer", str(tmp_path / "tok.safetensors"), "--out", str(out)]) == 2
    assert main(["sample", *_ckpts(tmp_path), "--cfg", "1,2,3", "--out", str(out)]) == 2    # argparse: 3 parts
    assert not out.exists() or not any(out.iterdir())
