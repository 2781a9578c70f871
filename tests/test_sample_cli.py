"""`dar-fast sample` with given checkpoints: PNGs, grid, preview strips; bad input writes nothing."""
import numpy as np
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


def test_default_out_is_samples_and_a_rerun_does_nothing(tmp_path, monkeypatch, capsys):
    ck = _ckpts(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["sample", *ck, "--labels", "1", "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["grid.png", "sample_00000_class1.png",
                                                                         "settings.json"]
    assert not list(tmp_path.glob("*.png"))                     # nothing in the current directory itself
    before = (tmp_path / "samples" / "sample_00000_class1.png").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["sample", *ck, "--labels", "1", "--no-progress"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (tmp_path / "samples" / "sample_00000_class1.png").stat().st_mtime_ns == before
    # other settings into the same folder: refused, nothing overwritten
    assert main(["sample", *ck, "--labels", "1", "--seed", "7", "--no-progress"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert (tmp_path / "samples" / "sample_00000_class1.png").stat().st_mtime_ns == before


def test_ctrl_c_leaves_a_run_the_same_command_resumes(tmp_path, monkeypatch):
    from dar_fast.pipeline import Pipeline
    ck = _ckpts(tmp_path)
    argv = lambda out: ["sample", *ck, "--labels", "0", "1", "2", "--per-class", "2", "--batch-size", "2",  # noqa
                        "--previews", "--seed", "3", "--no-progress", "--out", str(out)]
    fresh = tmp_path / "fresh"
    assert main(argv(fresh)) == 0
    calls, real, interrupt = [], Pipeline.stream, [True]

    def interrupted(self, labels, **kw):
        calls.append(list(labels))
        if interrupt[0] and len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, labels, **kw)
    monkeypatch.setattr(Pipeline, "stream", interrupted)
    out = tmp_path / "out"
    assert main(argv(out)) == 130
    assert sorted(p.name for p in out.glob("sample_*.png")) == ["sample_00000_class0.png", "sample_00001_class0.png"]
    assert not (out / "grid.png").exists()
    calls.clear()
    interrupt[0] = False
    assert main(argv(out)) == 0
    assert calls == [[1, 1], [2, 2]]                               # the finished batch was not redone
    for f in sorted(p.name for p in fresh.iterdir() if p.suffix == ".png"):
        assert np.array_equal(np.asarray(Image.open(out / f)), np.asarray(Image.open(fresh / f))), f
    assert not (out / ".partial").exists()


def test_threads_default_and_verbose(tmp_path, capsys):
    import torch
    n = torch.get_num_threads()
    try:
        assert main(["sample", *_ckpts(tmp_path), "--labels", "0", "--out", str(tmp_path / "o"), "-v",
                     "--no-progress"]) == 0
        assert "threads: 1 (auto: small model" in capsys.readouterr().out
        assert main(["sample", *_ckpts(tmp_path), "--labels", "0", "--out", str(tmp_path / "o2"), "-v",
                     "--threads", "2", "--no-progress"]) == 0
        assert "threads: 2 (--threads)" in capsys.readouterr().out
    finally:
        torch.set_num_threads(n)
