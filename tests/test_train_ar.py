"""AR training on codes: a loss that falls, exact resume, schedule, class dropout, accumulation, bad input."""
import json

import numpy as np
import pytest
import torch

from dar_fast.api import load_ar
from dar_fast.cli import build_parser, main
from dar_fast.config import ARConfig
from dar_fast.models import ARModel
from dar_fast.training.ar_train import ARTrainer, ar_matmul_params, ar_train_flops
from dar_fast.training.data import CodeSet, CodesLoader
from dar_fast.training.distributed import DistEnv
from dar_fast.training.extract_codes import FORMAT
from dar_fast.training.loop import lr_at, read_metrics

AR = dict(dim=64, n_layer=2, n_head=2, vocab_size=32, block_size=16, num_classes=5,
          token_dropout_p=0.1, resid_dropout_p=0.1, ffn_dropout_p=0.1)


def write_codes(d, codes, labels, codebook=32):
    """A code directory as extract-codes writes it: codes (M, A, N), labels (M,), meta.json."""
    d.mkdir(parents=True, exist_ok=True)
    codes = np.asarray(codes, dtype=np.int16)
    np.save(d / "codes.npy", codes)
    np.save(d / "labels.npy", np.asarray(labels, dtype=np.int64))
    (d / "meta.json").write_text(json.dumps(dict(
        format=FORMAT, num_images=codes.shape[0], num_aug=codes.shape[1], num_tokens=codes.shape[2],
        codebook_size=codebook, dtype="int16", code_min=int(codes.min()), code_max=int(codes.max()),
        num_classes=int(max(labels)) + 1, skipped=0)))
    return str(d)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fixed_codes(tmp_path_factory):
    rng = np.random.default_rng(0)
    return write_codes(tmp_path_factory.mktemp("codes") / "c", rng.integers(0, 32, (8, 2, 16)),
                       rng.integers(0, 5, 8))


@pytest.fixture(scope="module")
def ar_cfg_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("cfg") / "ar.json"
    p.write_text(json.dumps(AR))
    return str(p)


def _argv(cfg, codes, out, steps, *extra, batch=8):
    # --device cpu: on a GPU machine "auto" trains in CUDA bf16 autocast, where bit-exact resume and the
    # 1e-5 accumulation tolerances mean something else
    return ["train-ar", "--preset", cfg, "--codes", codes, "--out", str(out), "--steps", str(steps),
            "--batch-size", str(batch), "--quiet", "--device", "cpu", *extra]


# ====================================================================================== runs

def test_loss_falls_and_final_loads(ar_cfg_file, fixed_codes, tmp_path):
    out = tmp_path / "run"
    assert main(_argv(ar_cfg_file, fixed_codes, out, 30, "--lr", "3e-3", "--lr-decay-frac", "0.2")) == 0
    recs = read_metrics(str(out))
    assert [r["step"] for r in recs] == list(range(1, 31))
    losses = [r["loss"] for r in recs]
    assert losses[0] == pytest.approx(np.log(32), abs=1e-4)            # zero-initialised head: uniform
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
    assert all(r["tokens_per_s"] > 0 and r["step_time_s"] > 0 for r in recs)
    # constant lr, then linear decay over the last 20% (6 steps) down to 1e-5 at the last step
    lrs = [r["lr"] for r in recs]
    assert lrs[:24] == [3e-3] * 24 and lrs[-1] == pytest.approx(1e-5) and lrs[24] < 3e-3
    ar = load_ar(str(out / "final.safetensors"))                       # no further arguments
    assert ar.cfg.to_dict() == ARConfig(**AR).to_dict()
    codes = torch.from_numpy(np.load(f"{fixed_codes}/codes.npy")[:, 0].astype(np.int64))
    assert ar(codes[:, :-1], torch.zeros(8, dtype=torch.long)).shape == (8, 16, 32)


def test_resume_is_bit_exact(ar_cfg_file, fixed_codes, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ("--lr-decay-frac", "0", "--log-every", "1")
    assert main(_argv(ar_cfg_file, fixed_codes, a, 6, *common)) == 0
    assert main(_argv(ar_cfg_file, fixed_codes, b, 3, *common)) == 0
    assert main(_argv(ar_cfg_file, fixed_codes, b, 6, *common, "--resume")) == 0
    la, lb = read_metrics(str(a)), read_metrics(str(b))
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    assert [r["grad_norm"] for r in la] == [r["grad_norm"] for r in lb]
    from safetensors.torch import load_file
    wa, wb = load_file(str(a / "final.safetensors")), load_file(str(b / "final.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_grad_accumulation_matches_one_big_batch(ar_cfg_file, fixed_codes, tmp_path):
    cfg = tmp_path / "nodrop.json"
    cfg.write_text(json.dumps(dict(AR, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)))
    a, b = tmp_path / "a", tmp_path / "b"
    common = ("--class-dropout", "0", "--ema", "0")
    assert main(_argv(str(cfg), fixed_codes, a, 3, *common)) == 0
    assert main(_argv(str(cfg), fixed_codes, b, 3, *common, "--grad-accum", "4")) == 0
    la, lb = read_metrics(str(a)), read_metrics(str(b))
    assert np.allclose([r["loss"] for r in la], [r["loss"] for r in lb], rtol=1e-5)
    wa, wb = load_ar(str(a / "final.safetensors")), load_ar(str(b / "final.safetensors"))
    for (k, x), y in zip(wa.state_dict().items(), wb.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-5), k


# ====================================================================================== pieces

def test_lr_schedule():
    assert lr_at(1, 1.0, warmup=4) == 0.25 and lr_at(4, 1.0, warmup=4) == 1.0
    assert lr_at(50, 4e-4, decay_start=80, total=100, final=1e-5) == 4e-4
    assert lr_at(90, 4e-4, decay_start=80, total=100, final=1e-5) == pytest.approx((4e-4 + 1e-5) / 2)
    assert lr_at(100, 4e-4, decay_start=80, total=100, final=1e-5) == pytest.approx(1e-5)


def test_class_dropout_and_init(ar_cfg_file, fixed_codes, tmp_path):
    args = build_parser().parse_args(_argv(ar_cfg_file, fixed_codes, tmp_path / "x", 1))
    tr = ARTrainer(args, DistEnv())
    labels = torch.randint(0, 5, (20000,))
    (codes, got), = tr.micro_batches((torch.zeros(20000, 16, dtype=torch.long), labels))
    null = got == 5
    assert 0.09 < null.float().mean() < 0.11                         # 10% replaced by the null class
    assert torch.equal(got[~null], labels[~null])
    torch.manual_seed(0)
    ar = ARModel(ARConfig(**AR)).initialize_weights()
    assert ar.output.weight.abs().sum() == 0
    assert 0.015 < ar.tok_embeddings.weight.std() < 0.025


def test_flops_count():
    cfg = ARConfig(**AR)
    ar = ARModel(cfg)
    lin = sum(m.weight.numel() for m in ar.modules() if isinstance(m, torch.nn.Linear))
    assert ar_matmul_params(cfg) == lin
    assert ar_train_flops(cfg, 2) == 2 * (6 * lin * 16 + 12 * 2 * 64 * 16 * 16)


def test_codes_loader_shards_and_resumes(tmp_path):
    rng = np.random.default_rng(1)
    d = write_codes(tmp_path / "c", rng.integers(0, 32, (40, 2, 16)), rng.integers(0, 5, 40))
    cs = CodeSet(d)
    seen = []
    for r in range(2):
        ld = CodesLoader(cs, 4, rank=r, world_size=2, seed=3)
        rows = set()
        for _ in range(ld.steps_per_epoch):
            c, _ = next(ld)
            rows |= {tuple(x) for x in c.tolist()}
        seen.append(rows)
    assert not (seen[0] & seen[1]) and len(seen[0] | seen[1]) == 40   # disjoint, together one epoch
    ld = CodesLoader(cs, 4, seed=3)
    for _ in range(7):
        next(ld)
    st = ld.state_dict()
    want = [next(ld) for _ in range(5)]
    ld2 = CodesLoader(cs, 4, seed=3)
    ld2.load_state_dict(st)
    for (c1, l1), (c2, l2) in zip(want, [next(ld2) for _ in range(5)]):
        assert torch.equal(c1, c2) and torch.equal(l1, l2)


# ====================================================================================== bad input

def test_errors(ar_cfg_file, fixed_codes, tmp_path, capsys):
    def err(argv):
        capsys.readouterr()
        assert main(argv) == 2
        return capsys.readouterr().err

    assert "not found" in err(_argv(ar_cfg_file, str(tmp_path / "none"), tmp_path / "o", 2))
    (tmp_path / "half").mkdir()
    assert "extract-codes" in err(_argv(ar_cfg_file, str(tmp_path / "half"), tmp_path / "o", 2))
    rng = np.random.default_rng(0)
    wrong_vocab = write_codes(tmp_path / "v", rng.integers(0, 32, (8, 1, 16)), [0] * 8, codebook=64)
    assert "vocab_size" in err(_argv(ar_cfg_file, wrong_vocab, tmp_path / "o", 2))
    wrong_len = write_codes(tmp_path / "n", rng.integers(0, 32, (8, 1, 12)), [0] * 8)
    assert "block_size" in err(_argv(ar_cfg_file, wrong_len, tmp_path / "o", 2))
    wrong_cls = write_codes(tmp_path / "k", rng.integers(0, 32, (8, 1, 16)), [9] * 8)
    assert "num_classes" in err(_argv(ar_cfg_file, wrong_cls, tmp_path / "o", 2))
    assert "fewer than one global batch" in err(_argv(ar_cfg_file, fixed_codes, tmp_path / "o", 2, batch=16))
    run = tmp_path / "run"
    assert main(_argv(ar_cfg_file, fixed_codes, run, 1)) == 0
    other = tmp_path / "other.json"
    other.write_text(json.dumps(dict(AR, dim=128)))
    e = err(_argv(str(other), fixed_codes, run, 2, "--resume"))
    assert "another configuration" in e and "dim" in e
    assert "--resume" in err(_argv(ar_cfg_file, fixed_codes, run, 2))
    # a file that is not one of our checkpoints, and one of the other trainer
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert "not a readable dar-fast training checkpoint" in err(
        _argv(ar_cfg_file, fixed_codes, tmp_path / "o2", 2, "--resume", str(junk)))
    torch.save({"model": {"w": torch.zeros(1)}}, junk)
    assert "not a dar-fast training checkpoint" in err(
        _argv(ar_cfg_file, fixed_codes, tmp_path / "o3", 2, "--resume", str(junk)))
