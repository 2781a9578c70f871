"""Tokenizer training: the objective's pieces against loops, a loss that falls, exact resume, bad input."""
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dar_fast.api import load_tokenizer
from dar_fast.cli import build_parser, main
from dar_fast.models.diffusion import time_shift, training_group
from dar_fast.training.data import ArraySource, load_digits_arrays
from dar_fast.training.losses import (TokenizerObjective, causal_group_mask, gather_group, quantize_st,
                                      vq_losses)
from dar_fast.training.loop import read_metrics
from dar_fast.training.tokenizer_train import tokenizer_forward_flops, tokenizer_train_flops, train_tokenizer

from helpers import tiny_tokenizer, tiny_tokenizer_config



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_cfg_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("cfg") / "tok.json"
    p.write_text(json.dumps(tiny_tokenizer_config().to_dict()))
    return str(p)


@pytest.fixture(scope="module")
def fixed_digits():
    """8 digits (one batch): every step sees the same images, so the loss must fall."""
    images, labels = load_digits_arrays()
    return ArraySource(images[:8], labels[:8])


def _args(argv, data=None):
    args = build_parser().parse_args(argv)
    if data is not None:
        args.data = data
    return args


def _base(cfg_file, out, steps, extra=(), data="digits", batch=8, lpips=("--lpips-weight", "0")):
    # --device cpu: "auto" would take CUDA bf16 on a GPU machine (see test_train_ar._argv)
    return ["train-tokenizer", "--preset", cfg_file, "--data", str(data), "--out", str(out), "--steps", str(steps),
            "--batch-size", str(batch), *lpips, "--warmup", "0", "--quiet", "--device", "cpu", *extra]


# ====================================================================================== pieces

def test_quantize_matches_encode_and_straight_through():
    tok = tiny_tokenizer(seed=1)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    z = tok.encode_latents(x)
    zn, q, idx = quantize_st(z, tok.quantize.embedding.weight)
    assert torch.equal(idx, tok.encode(x))
    assert torch.allclose(q, tok.quantize.lookup(idx), atol=1e-6)
    assert torch.allclose(zn.norm(dim=-1), torch.ones(3, tok.num_tokens), atol=1e-5)
    # straight-through: the condition's value is the code vectors', its gradient reaches the encoder
    zst = zn + (q - zn).detach()
    assert torch.allclose(tok.cond_from_vectors(zst), tok.cond(idx), atol=1e-5)
    tok.cond_from_vectors(zst).sum().backward()
    assert tok.encoder_layers[0].attention.q.weight.grad is not None
    assert tok.encoder_layers[0].attention.q.weight.grad.abs().sum() > 0


def test_vq_loss_mask_and_group_gather_against_loops():
    torch.manual_seed(0)
    B, N, G, d = 5, 16, 4, 8
    zn = F.normalize(torch.randn(B, N, d), dim=-1)
    q = F.normalize(torch.randn(B, N, d), dim=-1)
    g = torch.tensor([0, 3, 1, 2, 3])
    mask = causal_group_mask(g, N, G)
    cb, cm = vq_losses(zn, q, mask)
    per_tok = ((q - zn) ** 2).mean(-1)
    sel = [per_tok[b, : (int(g[b]) + 1) * G] for b in range(B)]
    want = torch.cat(sel).mean()
    assert torch.allclose(cb, want, atol=1e-6) and torch.allclose(cm, 0.25 * want, atol=1e-6)
    cond = torch.randn(B, N, 7)
    got = gather_group(cond, g, G)
    for b in range(B):
        assert torch.equal(got[b], cond[b, int(g[b]) * G:(int(g[b]) + 1) * G])


def test_objective_terms_match_a_direct_computation():
    tok = tiny_tokenizer(seed=2).train()
    obj = TokenizerObjective(tok)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    x0 = torch.randn(4, 3, 32, 32)
    u = torch.tensor([0.05, 0.3, 0.62, 0.97])
    terms = obj(x, x0, u)
    assert set(terms) >= {"loss", "loss_fm", "loss_codebook", "loss_commit"}
    # flow matching by hand, one sample at a time with the model's own pieces
    cfg = tok.cfg.diff_decoder
    codes = tok.encode(x)
    cond = tok.cond(codes)
    fm = 0
    for b in range(4):
        g = int(training_group(u[b:b + 1], tok.num_groups))
        t = time_shift(u[b:b + 1], cfg.time_shift)
        x1 = x[b:b + 1] * cfg.data_std
        xt = t * x1 + (1 - t) * x0[b:b + 1]
        v = tok.velocity(xt, t, tok.group(cond, g)[b:b + 1])
        fm = fm + ((v - (x1 - x0[b:b + 1])) ** 2).mean() / cfg.data_std ** 2 / 4
    assert torch.allclose(terms["loss_fm"], fm, rtol=1e-4, atol=1e-5)
    assert torch.allclose(terms["loss"], terms["loss_fm"] + terms["loss_codebook"] + terms["loss_commit"])


def test_lpips_and_repa_terms_enter_with_their_weights():
    class FakeLPIPS(torch.nn.Module):
        def forward(self, a, b):
            return ((a - b) ** 2).flatten(1).mean(1)

    class FakeDino:
        def patch_features(self, images):
            # a 8x8 grid of 16-dim "features": the objective pools it to the head's 4x4
            g = F.adaptive_avg_pool2d(images, 8).flatten(2).transpose(1, 2)          # (B, 64, 3)
            return torch.cat([g, g.pow(2), g.sin(), g.cos(), g[..., :1].expand(-1, -1, 4)], -1)

    cfg = tiny_tokenizer_config(repa_head=True, diff_decoder=dict(repa_layer=1, repa_dim=16, repa_hidden=32,
                                                                  repa_grid=4))
    from dar_fast.models import Tokenizer
    from helpers import randomize_
    tok = randomize_(Tokenizer(cfg), seed=3).train()
    obj = TokenizerObjective(tok, FakeLPIPS(), 0.5, FakeDino(), 0.5)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    terms = obj(x, torch.randn_like(x), torch.rand(2))
    want = terms["loss_fm"] + terms["loss_codebook"] + terms["loss_commit"] + 0.5 * terms["loss_lpips"] \
        + 0.5 * terms["loss_repa"]
    assert torch.allclose(terms["loss"], want)
    assert 0 <= float(terms["loss_repa"].detach()) <= 2
    terms["loss"].backward()
    assert tok.net.repa_out[0].weight.grad.abs().sum() > 0          # REPA trains its head
    assert "lpips" not in dict(obj.named_modules())                  # frozen nets stay outside the module tree


def test_init_and_flops():
    torch.manual_seed(0)
    from dar_fast.models import Tokenizer
    tok = Tokenizer(tiny_tokenizer_config()).initialize_weights()
    assert tok.net.conv_out.weight.abs().sum() == 0                   # v = 0 at the start
    assert torch.allclose(tok.quantize.embedding.weight.norm(dim=-1), torch.ones(32), atol=1e-5)
    f = tokenizer_forward_flops(tok.cfg)
    assert all(v > 0 for v in f.values())
    assert tokenizer_train_flops(tok.cfg, 8) == pytest.approx(3 * 8 * (f["encoder"] + f["decoder"] + f["diffusion"]))


# ====================================================================================== training runs

def test_loss_falls_on_a_fixed_batch_and_outputs_load(tiny_cfg_file, fixed_digits, tmp_path):
    out = tmp_path / "run"
    args = _args(_base(tiny_cfg_file, out, 40, ["--lr", "2e-3", "--ema", "0.9"]), data=fixed_digits)
    train_tokenizer(args)
    recs = read_metrics(str(out))
    assert [r["step"] for r in recs] == list(range(1, 41))
    for key in ("loss", "loss_fm", "loss_codebook", "loss_commit", "lr", "images_per_s", "step_time_s", "grad_norm"):
        assert all(np.isfinite(r[key]) for r in recs), key
    losses = [r["loss"] for r in recs]
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    assert last < 0.8 * first, (first, last)
    tok = load_tokenizer(str(out / "final.safetensors"))          # no further arguments
    assert tok.cfg.to_dict() == dataclasses.replace(tiny_tokenizer_config()).to_dict()
    assert tok.encode(torch.zeros(1, 3, 32, 32)).shape == (1, 16)
    assert (out / "checkpoint.pt").exists() and (out / "run.json").exists()


def test_resume_is_bit_exact(tiny_cfg_file, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_base(tiny_cfg_file, a, 6)) == 0
    assert main(_base(tiny_cfg_file, b, 3)) == 0
    assert main(_base(tiny_cfg_file, b, 6, ["--resume"])) == 0
    la, lb = read_metrics(str(a)), read_metrics(str(b))
    assert [r["step"] for r in lb] == list(range(1, 7))
    for ra, rb in zip(la, lb):
        for k in ("loss", "loss_fm", "loss_codebook", "loss_commit", "grad_norm"):
            assert ra[k] == rb[k], (ra["step"], k)
    from safetensors.torch import load_file
    wa, wb = load_file(str(a / "final.safetensors")), load_file(str(b / "final.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ====================================================================================== bad input

def test_errors(tiny_cfg_file, tmp_path, capsys):
    def err(argv):
        capsys.readouterr()
        assert main(argv) == 2
        return capsys.readouterr().err

    # a positive LPIPS weight without its weights; REPA without a head
    e = err(_base(tiny_cfg_file, tmp_path / "x", 2, lpips=()))
    assert "--lpips-vgg" in e and "--lpips-weight 0" in e
    e = err(_base(tiny_cfg_file, tmp_path / "x", 2, ["--repa-weight", "0.5"]))
    assert "REPA head" in e
    # missing / empty data directory
    assert "not found" in err(_base(tiny_cfg_file, tmp_path / "x", 2, data=tmp_path / "none"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "empty" in err(_base(tiny_cfg_file, tmp_path / "x", 2, data=empty))
    # batch that does not split into micro-batches
    assert "--grad-accum" in err(_base(tiny_cfg_file, tmp_path / "x", 2, ["--grad-accum", "3"]))
    # an existing run without --resume; a resume from another config
    run = tmp_path / "run"
    assert main(_base(tiny_cfg_file, run, 1)) == 0
    assert "--resume" in err(_base(tiny_cfg_file, run, 2))
    other = str(tmp_path / "other.json")
    with open(other, "w") as f:
        json.dump(tiny_tokenizer_config(vq_codebook_size=64).to_dict(), f)
    e = err(_base(other, run, 2, ["--resume"]))
    assert "another configuration" in e and "vq_codebook_size" in e
    e = err(_base(tiny_cfg_file, run, 2, ["--resume"], batch=4))
    assert "global_batch" in e
    assert "already at step 1" in err(_base(tiny_cfg_file, run, 1, ["--resume"]))
    assert "no checkpoint" in err(_base(tiny_cfg_file, tmp_path / "fresh", 2, ["--resume"]))


@pytest.mark.slow     # builds full-size VGG16 and DINOv2-B: ~40 s on 2 busy cores
def test_real_lpips_and_dinov2_files_wire_in(tmp_path):
    """Both frozen networks from weight files (random weights in the real layouts, full-size DINOv2-B/14):
    two steps with --lpips-weight 0.5 --repa-weight 0.5, every term finite and summed with its weight."""
    from dar_fast.training.dinov2 import ARCHS, DINOv2
    from dar_fast.training.lpips import LPIPS_CHANNELS, VGG16Features
    torch.manual_seed(0)
    torch.save(VGG16Features().state_dict(), tmp_path / "vgg16.pth")
    torch.save({f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) * 0.1 for k, c in enumerate(LPIPS_CHANNELS)},
               tmp_path / "lin.pth")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in DINOv2(**ARCHS["vitb14"]).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    dino = {k: (torch.randn(s, generator=g) * 0.02 + (1.0 if k.endswith(("norm1.weight", "norm2.weight",
                                                                       "norm.weight", "gamma")) else 0.0)).half()
            for k, s in shapes.items()}
    torch.save(dino, tmp_path / "dinov2_vitb14_pretrain.pth")
    cfg = tmp_path / "tok.json"
    cfg.write_text(json.dumps(tiny_tokenizer_config(
        repa_head=True, diff_decoder=dict(repa_layer=1, repa_dim=768, repa_hidden=64, repa_grid=16)).to_dict()))
    out = tmp_path / "run"
    assert main(_base(str(cfg), out, 2, ["--lpips-vgg", str(tmp_path / "vgg16.pth"), "--lpips-lin",
                                         str(tmp_path / "lin.pth"), "--dinov2", str(tmp_path), "--repa-weight",
                                         "0.5"], batch=2, lpips=("--lpips-weight", "0.5"))) == 0
    for r in read_metrics(str(out)):
        assert all(np.isfinite(r[k]) for k in ("loss_lpips", "loss_repa"))
        want = r["loss_fm"] + r["loss_codebook"] + r["loss_commit"] + 0.5 * r["loss_lpips"] + 0.5 * r["loss_repa"]
        assert r["loss"] == pytest.approx(want, rel=1e-5)
    assert load_tokenizer(str(out / "final.safetensors")).net.repa_out is not None
