"""`dar-fast reconstruct`: the released protocol recomputed independently, identical files for any process count
and batch size, kill + rerun, metrics that match the files, `eval` on the pair, and bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import dar_fast
from helpers import tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
N = 10          # images; the tiny tokenizer works at 32x32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("recon")
    tok = tiny_tokenizer(seed=5)
    dar_fast.save_tokenizer(tok, str(d / "tok.safetensors"))
    rng = np.random.default_rng(7)
    # an ImageFolder of odd-sized images (landscape, portrait, > 2x the crop to exercise the BOX halving)
    sizes = [(40, 52), (33, 70), (97, 65), (32, 32), (130, 41), (47, 47), (64, 90), (71, 35), (38, 200), (55, 60)]
    for i, (w, h) in enumerate(sizes):
        cls = d / "data" / f"c{i % 2}"
        cls.mkdir(parents=True, exist_ok=True)
        ramp = np.linspace(0, 255, w)[None, :, None] * np.linspace(0.2, 1, h)[:, None, None]
        img = np.clip(ramp + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(cls / f"img{i:02d}.png")
    return d, str(d / "tok.safetensors"), str(d / "data")


def _args(setup, out, bs=4, extra=()):
    d, tok, data = setup
    return ["reconstruct", "--tokenizer", tok, "--data", data, "--out", str(out), "--batch-size", str(bs),
            "--precision", "float32", "--seed", "3", "--device", "cpu", "--num-workers", "2",
            *extra]


def _run(argv):
    from dar_fast.cli import main
    return main(argv)


def _torchrun(argv, nproc=2, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           "-m", "dar_fast.cli", *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _same(a, b):
    """Two reconstruction .npz files agree: labels exactly, pixels up to float rounding (measured on the digits
    tokenizer, batch 1 vs 64: 3.8e-5 of the values differ, by 1 level; batch 7 vs 64 and 1 vs 2 processes: none)."""
    a, b = np.load(a), np.load(b)
    assert np.array_equal(a["arr_1"], b["arr_1"])
    d = np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int))
    assert d.max() <= 1 and (d > 0).mean() < 0.01, (d.max(), (d > 0).mean())
    return (d > 0).mean()


def _center_crop_arr(img: Image.Image, s: int) -> np.ndarray:
    """ADM / LlamaGen center_crop_arr, written out here independently of training.data."""
    while min(*img.size) >= 2 * s:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = s / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.array(img)
    y, x = (arr.shape[0] - s) // 2, (arr.shape[1] - s) // 2
    return arr[y:y + s, x:x + s]


@pytest.fixture(scope="module")
def reference_run(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "r.npz"
    assert _run(_args(setup, out, extra=["--keep-shards"])) == 0
    return out


def test_protocol_recomputed_independently(setup, reference_run):
    """gt = ADM centre crops; recon = the released uint8 conversion of decode(encode(crop)) with keyed noise."""
    from dar_fast import ops
    from dar_fast.seeding import sample_noise
    d, tok_path, data = setup
    out = reference_run
    r, g = np.load(out), np.load(str(out)[:-4] + "_gt.npz")
    files = sorted((p for p in (d / "data").rglob("*.png")), key=lambda p: (p.parent.name, p.name))
    crops = np.stack([_center_crop_arr(Image.open(p).convert("RGB"), 32) for p in files])
    assert np.array_equal(g["arr_0"], crops)
    assert g["arr_1"].tolist() == [int(p.parent.name[1]) for p in files] == r["arr_1"].tolist()
    tok = dar_fast.load_tokenizer(tok_path)
    x = (torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    codes = tok.encode(x)
    ids = torch.arange(N)
    img = tok.decode(codes, noise=sample_noise(torch.full((N,), 3), ids, (3, 32, 32)))
    want = ops.images_to_uint8(img).numpy()
    d_ = np.abs(want.astype(int) - r["arr_0"].astype(int))
    assert d_.max() <= 1 and (d_ > 0).mean() < 0.01
    shards = sorted((out.parent / "r.npz.shards").glob("shard_*.npz"))
    assert np.array_equal(np.concatenate([np.load(s)["codes"] for s in shards]), codes.numpy())


def test_metrics_match_the_files(setup, reference_run):
    from dar_fast.eval.image_metrics import frechet_distance_features, psnr, ssim, ssim_released
    from dar_fast.reconstruct import pooled_pixel_features
    out = reference_run
    r, g = np.load(out)["arr_0"], np.load(str(out)[:-4] + "_gt.npz")["arr_0"]
    m = json.loads((out.parent / "r.json").read_text())
    met = m["metrics"]
    assert met["num_images"] == N and m["settings"]["num_images"] == N
    np.testing.assert_allclose(met["per_image"]["psnr"], psnr(r, g), rtol=1e-12)
    np.testing.assert_allclose(met["per_image"]["ssim"], ssim(r, g), rtol=1e-12)
    np.testing.assert_allclose(met["per_image"]["ssim_released"], ssim_released(r, g), rtol=1e-12)
    assert met["psnr_mean"] == pytest.approx(psnr(r, g).mean(), rel=1e-12)
    assert met["ssim_mean"] == pytest.approx(ssim(r, g).mean(), rel=1e-12)
    assert met["frechet_distance_pooled_pixels"] == pytest.approx(
        frechet_distance_features(pooled_pixel_features(r), pooled_pixel_features(g)), rel=1e-9)
    assert "NOT Inception" in met["frechet_distance_features"]
    s = m["settings"]
    assert (s["steps"], s["solver"], s["precision"], s["crop"]) == (4, "adams2", "float32", "adm_center_crop_arr")
    assert s["weights"] == dar_fast.load_tokenizer(setup[1]).loaded_weights


def test_batch_size_invariance(setup, reference_run, tmp_path):
    out = tmp_path / "b3.npz"
    assert _run(_args(setup, out, bs=3)) == 0
    _same(reference_run, out)
    _same(str(reference_run)[:-4] + "_gt.npz", str(out)[:-4] + "_gt.npz")
    assert np.array_equal(np.load(str(reference_run)[:-4] + "_gt.npz")["arr_0"],
                          np.load(str(out)[:-4] + "_gt.npz")["arr_0"])


@pytest.mark.dist
def test_one_vs_two_processes(setup, reference_run, tmp_path):
    out = tmp_path / "two.npz"
    r = _torchrun(_args(setup, out, bs=3))
    assert r.returncode == 0, r.stderr[-3000:]
    _same(reference_run, out)
    assert np.array_equal(np.load(str(reference_run)[:-4] + "_gt.npz")["arr_0"],
                          np.load(str(out)[:-4] + "_gt.npz")["arr_0"])
    a = json.loads((tmp_path / "two.json").read_text())["metrics"]
    b = json.loads((reference_run.parent / "r.json").read_text())["metrics"]
    assert a["num_images"] == b["num_images"] == N


def test_kill_and_rerun_gives_the_same_file(setup, reference_run, tmp_path):
    out = tmp_path / "k.npz"
    shard_dir = tmp_path / "k.npz.shards"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "dar_fast.cli", *_args(setup, out, bs=1)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while time.time() - t0 < 120 and p.poll() is None:
        if shard_dir.is_dir() and len(list(shard_dir.glob("shard_*.npz"))) >= 2:
            break
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not out.exists(), "the run finished before it could be killed; make the test's run longer"
    (shard_dir / ".shard_000009.npz.abc.tmp").write_bytes(b"partial")     # what a kill during a write leaves
    assert _run(_args(setup, out, bs=1)) == 0
    _same(reference_run, out)
    assert not shard_dir.exists()
    clean = tmp_path / "clean.npz"                   # an uninterrupted run with the same settings: byte-identical
    assert _run(_args(setup, clean, bs=1)) == 0
    for suffix in (".npz", "_gt.npz"):
        a, b = np.load(str(out)[:-4] + suffix), np.load(str(clean)[:-4] + suffix)
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])


def test_corrupted_shard_is_regenerated(setup, tmp_path, capsys):
    out = tmp_path / "c.npz"
    argv = _args(setup, out, extra=["--keep-shards", "--num-images", "6"])
    assert _run(argv) == 0
    first = {s: np.load(str(out)[:-4] + s)["arr_0"] for s in (".npz", "_gt.npz")}
    for s in (".npz", "_gt.npz", ".json"):                 # as if killed before the assembly
        os.remove(str(out)[:-4] + s)
    (tmp_path / "c.npz.shards" / "shard_000001.npz").write_bytes(b"garbage")
    capsys.readouterr()
    assert _run(argv) == 0
    assert "failed verification" in capsys.readouterr().err
    for s, a in first.items():
        assert np.array_equal(np.load(str(out)[:-4] + s)["arr_0"], a)


def test_webdataset_tars_give_the_same_files(setup, reference_run, tmp_path):
    import tarfile
    d = setup[0]
    files = sorted((p for p in (d / "data").rglob("*.png")), key=lambda p: (p.parent.name, p.name))
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tf:        # same order as the folder: same indices
        for i, p in enumerate(files):
            tf.add(p, arcname=f"{i:05d}.png")
            cls = tmp_path / "cls"
            cls.write_text(p.parent.name[1])
            tf.add(cls, arcname=f"{i:05d}.cls")
    out = tmp_path / "t.npz"
    argv = _args(setup, out)
    argv[argv.index("--data") + 1] = str(tmp_path / "shard-000.tar")
    assert _run(argv) == 0
    assert np.array_equal(np.load(str(out)[:-4] + "_gt.npz")["arr_0"],
                          np.load(str(reference_run)[:-4] + "_gt.npz")["arr_0"])
    _same(reference_run, out)


def test_steps_solver_and_previews(setup, reference_run, tmp_path):
    from dar_fast import ops
    from dar_fast.seeding import sample_noise
    out = tmp_path / "e.npz"
    assert _run(_args(setup, out, extra=["--steps", "2", "--solver", "euler", "--previews", "--num-images", "5",
                                         "--keep-shards"])) == 0
    tok = dar_fast.load_tokenizer(setup[1])
    shards = sorted((tmp_path / "e.npz.shards").glob("shard_*.npz"))
    codes = torch.from_numpy(np.concatenate([np.load(s)["codes"] for s in shards]))
    noise = sample_noise(torch.full((5,), 3), torch.arange(5), (3, 32, 32))
    want = ops.images_to_uint8(tok.decode(codes, noise=noise, steps=2, solver="euler")).numpy()
    got = np.load(out)["arr_0"]
    assert got.shape == (5, 32, 32, 3)
    d = np.abs(want.astype(int) - got.astype(int))
    assert d.max() <= 1 and (d > 0).mean() < 0.01
    assert not np.array_equal(got, np.load(reference_run)["arr_0"][:5])      # 2 Euler steps differ from 4 adams2
    png = np.asarray(Image.open(tmp_path / "e_previews.png"))
    # 5 rows x (input, 1 preview, reconstruction), 32 px scaled 3x, 2 px padding
    assert png.shape == (5 * (96 + 2) + 2, 3 * (96 + 2) + 2, 3)


def test_released_precision_and_gt_pixels(setup, reference_run, tmp_path):
    from dar_fast.reconstruct import released_gt_lut
    out = tmp_path / "rel.npz"
    argv = _args(setup, out, extra=["--gt-pixels", "released", "--num-images", "4"])
    argv[argv.index("float32")] = "released"                      # bf16 autocast, as the released script
    assert _run(argv) == 0
    m = json.loads((tmp_path / "rel.json").read_text())
    assert m["settings"]["precision"] == "released" and m["settings"]["gt_pixels"] == "released"
    gt = np.load(str(out)[:-4] + "_gt.npz")["arr_0"]
    exact = np.load(str(reference_run)[:-4] + "_gt.npz")["arr_0"][:4]
    lut = released_gt_lut()
    assert np.array_equal(gt, lut[exact])
    # the released float32 chain, computed here with numpy alone: p in 1..63 come out as p - 1
    p = np.arange(256, dtype=np.float32)
    chain = ((((p / np.float32(255) - np.float32(0.5)) / np.float32(0.5)) + np.float32(1)) / np.float32(2)
             * np.float32(255)).astype(np.uint8)
    assert np.array_equal(lut, chain)
    assert np.flatnonzero(lut != np.arange(256)).tolist() == list(range(1, 64))
    r = np.load(out)["arr_0"]
    assert r.shape == (4, 32, 32, 3) and r.dtype == np.uint8


def test_rerun_is_a_no_op_and_other_settings_are_refused(setup, tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert _run(_args(setup, out, extra=["--num-images", "3"])) == 0
    mtime = os.path.getmtime(out)
    assert _run(_args(setup, out, extra=["--num-images", "3"])) == 0
    assert "already finished" in capsys.readouterr().out and os.path.getmtime(out) == mtime
    assert _run(_args(setup, out, extra=["--num-images", "3", "--seed", "4"])) == 2
    assert "other settings" in capsys.readouterr().err and os.path.getmtime(out) == mtime
    assert _run(_args(setup, out, extra=["--num-images", "3", "--seed", "4", "--overwrite"])) == 0
    assert json.loads((tmp_path / "s.json").read_text())["settings"]["seed"] == 4


@pytest.mark.slow       # 20 random-weight Inception forwards at 299x299: ~25 s on one CPU core
def test_eval_runs_on_the_pair(setup, reference_run, tmp_path, monkeypatch, capsys):
    pytest.importorskip("scipy")
    from dar_fast.eval.inception import INCEPTION_FILENAME
    from helpers import random_inception_state_dict as random_state_dict
    weights = tmp_path / INCEPTION_FILENAME
    torch.save(random_state_dict(seed=1), weights)
    calls = []

    def spy(mu1, sigma1, mu2, sigma2):        # skip the 2048^3 sqrtm (tested in test_eval_metrics)
        calls.append(mu1.shape)
        return float(np.sum((mu1 - mu2) ** 2))

    monkeypatch.setattr("dar_fast.eval.cli.frechet_distance", spy)
    m = tmp_path / "m.json"
    rc = _run(["eval", "--ref", str(reference_run)[:-4] + "_gt.npz", "--sample", str(reference_run),
               "--inception", str(weights), "--device", "cpu", "--batch-size", "10", "--no-progress",
               "--out", str(m)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(m.read_text())
    assert res["num_samples"] == N and res["num_reference_images"] == N
    assert calls == [(2048,), (2023,)] and res["fid"] > 0
    assert 0 <= res["precision"] <= 1 and 0 <= res["recall"] <= 1


@pytest.mark.parametrize("case,match", [
    ("out_ext", "--out must end in .npz"), ("too_many", "holds 10 images"), ("no_data", "--data"),
    ("steps", "--steps must be >= 1"), ("same_gt", "same file"), ("size", "not divisible"),
    ("bad_image", "cannot decode image"),
])
def test_bad_input(setup, tmp_path, capsys, case, match):
    out = tmp_path / "x.npz"
    extra = []
    argv = _args(setup, out)
    if case == "out_ext":
        argv = _args(setup, tmp_path / "x.bin")
    elif case == "too_many":
        extra = ["--num-images", "11"]
    elif case == "no_data":
        argv[argv.index("--data") + 1] = str(tmp_path / "nowhere")
    elif case == "steps":
        extra = ["--steps", "0"]
    elif case == "same_gt":
        extra = ["--gt-out", str(out)]
    elif case == "size":
        extra = ["--image-size", "36"]
    else:
        bad = tmp_path / "bad" / "c0"
        bad.mkdir(parents=True)
        (bad / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        argv[argv.index("--data") + 1] = str(tmp_path / "bad")
    assert _run(argv + extra) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and match in errors[0] and "Traceback" not in err, err
    assert not out.exists() and not (tmp_path / "x_gt.npz").exists()
