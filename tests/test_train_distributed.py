"""Two gloo processes under torchrun on CPU: DDP runs of both trainers, FSDP2 with an exact resume, batch split."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dar_fast.api import load_ar, load_tokenizer
from dar_fast.cli import build_parser
from dar_fast.training.distributed import DistEnv
from dar_fast.training.loop import read_metrics

from helpers import tiny_tokenizer_config
from test_train_ar import AR, write_codes

pytestmark = pytest.mark.dist
TIMEOUT = 240


def torchrun(*argv):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "dar_fast.cli", *map(str, argv), "--device", "cpu"]   # gloo on the CPU, GPUs or not
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    return p.returncode, p.stdout + p.stderr


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    (d / "ar.json").write_text(json.dumps(AR))
    (d / "tok.json").write_text(json.dumps(tiny_tokenizer_config().to_dict()))
    rng = np.random.default_rng(0)
    codes = write_codes(d / "codes", rng.integers(0, 32, (24, 2, 16)), rng.integers(0, 5, 24))
    return d, codes


def test_ar_ddp_and_fsdp2_with_a_resume_across_them(files):
    d, codes = files
    base = ["train-ar", "--preset", d / "ar.json", "--codes", codes, "--batch-size", 8, "--lr-decay-frac", 0,
            "--quiet"]
    # reference: FSDP2 (fully_shard per block, applied from outside the model), 4 steps in one go
    rc, log = torchrun(*base, "--out", d / "fsdp", "--steps", 4, "--strategy", "fsdp")
    assert rc == 0, log[-3000:]
    # DDP for 2 steps, then the same run resumed under FSDP2 (the checkpoint holds full, unsharded state)
    rc, log = torchrun(*base, "--out", d / "mixed", "--steps", 2, "--strategy", "ddp")
    assert rc == 0, log[-3000:]
    run = json.loads((d / "mixed" / "run.json").read_text())
    assert (run["world_size"], run["strategy"], run["global_batch"], run["rank_batch"]) == (2, "ddp", 8, 4)
    rc, log = torchrun(*base, "--out", d / "mixed", "--steps", 4, "--strategy", "fsdp", "--resume")
    assert rc == 0, log[-3000:]
    ref, mixed = read_metrics(str(d / "fsdp")), read_metrics(str(d / "mixed"))
    assert [r["step"] for r in mixed] == [1, 2, 3, 4] and mixed[-1]["samples"] == 32
    # same data order, same sums: DDP and FSDP2 agree to float rounding
    assert np.allclose([r["loss"] for r in ref], [r["loss"] for r in mixed], rtol=1e-5, atol=1e-6)
    a, b = load_ar(str(d / "fsdp" / "final.safetensors")), load_ar(str(d / "mixed" / "final.safetensors"))
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-5), k


def test_tokenizer_ddp_then_sharded_extraction(files, tmp_path):
    d, _ = files
    rc, log = torchrun("train-tokenizer", "--preset", d / "tok.json", "--data", "digits", "--out", d / "tok",
                       "--steps", 2, "--batch-size", 4, "--lpips-weight", 0, "--warmup", 0)
    assert rc == 0, log[-3000:]
    assert "2 rank(s)" in log and "(ddp)" in log                      # rank-0 logging, once
    assert log.count("train-tokenizer: done") == 1
    recs = read_metrics(str(d / "tok"))
    assert [r["step"] for r in recs] == [1, 2] and all(r["images_per_s"] > 0 for r in recs)
    tok_file = str(d / "tok" / "final.safetensors")
    tok = load_tokenizer(tok_file)
    # codes of all 1797 digits, each rank encoding half, equal one process's
    rc, log = torchrun("extract-codes", "--tokenizer", tok_file, "--data", "digits", "--out", d / "codes2",
                       "--flip", "--batch-size", 256)
    assert rc == 0, log[-3000:]
    from dar_fast.training.extract_codes import extract_codes
    extract_codes(tok, "digits", str(tmp_path / "one"), flip=True, batch_size=256, device="cpu", quiet=True)
    for name in ("codes.npy", "labels.npy"):
        assert np.array_equal(np.load(d / "codes2" / name), np.load(tmp_path / "one" / name)), name
    assert json.loads((d / "codes2" / "meta.json").read_text())["world_size"] == 2


def test_global_batch_must_split_over_ranks(files):
    d, codes = files
    args = build_parser().parse_args(["train-ar", "--preset", str(d / "ar.json"), "--codes", codes, "--out",
                                      str(d / "x"), "--steps", "1", "--batch-size", "7"])
    from dar_fast.training.ar_train import ARTrainer
    with pytest.raises(ValueError, match="not divisible by the world size 2"):
        ARTrainer(args, DistEnv(rank=0, world_size=2))
