"""Reproduce every tensor the released implementation computed (copied into tests/data/reference), float32 on CPU."""
import json

import pytest
import torch
from safetensors.torch import load_file

import dar_fast
from conftest import rel_err

TOL = 1e-4   # float32 parity bound; we observe 2e-7 to 9e-7


@pytest.fixture(scope="module")
def tok_io(reference_dir):
    cfg = json.load(open(reference_dir / "tokenizer_tiny.json"))["model"]
    tok = dar_fast.load_tokenizer(str(reference_dir / "tokenizer_tiny.weights.safetensors"), config=cfg)
    return tok, load_file(reference_dir / "tokenizer_tiny.io.safetensors")


@pytest.fixture(scope="module")
def ar_io(reference_dir):
    cfg = json.load(open(reference_dir / "ar_tiny.json"))["model"]
    ar = dar_fast.load_ar(str(reference_dir / "ar_tiny.weights.safetensors"), config=cfg)
    return ar, load_file(reference_dir / "ar_tiny.io.safetensors")


def test_encode_codes_exact(tok_io):
    tok, io = tok_io
    assert torch.equal(tok.encode(io["images"]), io["codes"])


def test_condition_tokens(tok_io):
    tok, io = tok_io
    with torch.no_grad():
        assert rel_err(tok.cond(io["codes"]), io["cond"]) < TOL


def test_single_network_call(tok_io):
    tok, io = tok_io
    with torch.no_grad():
        v = tok.velocity(io["net_xt"], io["net_t"], io["cond"][:, 4:8])
    assert rel_err(v, io["net_v"]) < TOL


def test_decode_schedule_and_every_step(tok_io):
    tok, io = tok_io
    ts = tok.times()
    with torch.no_grad():
        for i in range(4):
            assert torch.allclose(io[f"decode_step{i}_t"], torch.full((2,), ts[i]), rtol=0, atol=1e-7)
            v = tok.velocity(io[f"decode_step{i}_xt"], io[f"decode_step{i}_t"], tok.group(io["cond"], i))
            assert rel_err(v, io[f"decode_step{i}_v"]) < TOL, i


def test_decode_and_preview(tok_io):
    tok, io = tok_io
    assert rel_err(tok.decode(io["codes"], noise=io["decode_x0"]), io["decode_out"]) < TOL
    assert rel_err(tok.decode(io["codes"], noise=io["decode_x0"], groups=2), io["preview2_out"]) < TOL
    # groups=K is the full decode
    assert torch.equal(tok.decode(io["codes"], noise=io["decode_x0"], groups=4),
                       tok.decode(io["codes"], noise=io["decode_x0"]))


def test_ar_teacher_forcing(ar_io):
    ar, io = ar_io
    tokens, labels = io["tokens"], io["class_labels"]
    with torch.no_grad():
        assert rel_err(ar(tokens[:, :-1], labels), io["teacher_logits"]) < TOL
        null = torch.full_like(labels, ar.null_class)
        assert rel_err(ar(tokens[:, :-1], null), io["null_teacher_logits"]) < TOL


def test_ar_kv_cache_matches_released(ar_io):
    ar, io = ar_io
    tokens, labels = io["tokens"], io["class_labels"]
    ar.setup_cache(2)
    with torch.no_grad():
        out = [ar.prefill(labels)]
        for j in range(tokens.shape[1] - 1):
            out.append(ar.decode_one(tokens[:, j], j + 1))
    assert rel_err(torch.stack(out, 1), io["kv_logits"]) < TOL


# ---------------------------------------------------------------------------- decode configurations, more AR options
# decode_public1: K=4 groups of 3, encoder patch 8, 2/4/8/12 steps with both solvers, a clip_steps preview, a larger
# decode (40x56), a non-square 32x48 image; decode_public2: K=8, output_resolution 12, 8/16 steps, a 3-of-4 preview.

def _decode_case(reference_dir, name):
    spec = json.load(open(reference_dir / f"{name}.json"))
    tok = dar_fast.load_tokenizer(str(reference_dir / f"{name}.weights.safetensors"), config=spec["model"])
    return tok, spec, load_file(reference_dir / f"{name}.io.safetensors")


@pytest.mark.parametrize("name", ["decode_public1", "decode_public2"])
def test_decode_public_encodes_exactly(reference_dir, name):
    tok, spec, io = _decode_case(reference_dir, name)
    for e in spec["encode"]:
        assert torch.equal(tok.encode(io[e["images"]]), io[e["codes"]]), e


@pytest.mark.parametrize("name", ["decode_public1", "decode_public2"])
def test_decode_public_calls(reference_dir, name):
    tok, spec, io = _decode_case(reference_dir, name)
    errs = {}
    for c in spec["calls"]:
        S = c["steps"]
        # the group each step reads, as the reference derived it
        assert tok.schedule(S)[1][:c["clip_steps"] or S] == c["groups_per_step"], c
        out = tok.decode(io[c["codes"]], noise=io[c["noise"]], steps=S, solver=c["solver"], clip_steps=c["clip_steps"])
        want = io[c["out"]]
        assert out.shape == want.shape, c
        errs[c["out"]] = rel_err(out, want)
        assert errs[c["out"]] < TOL, (c, errs[c["out"]])
    print(name, {k: f"{v:.1e}" for k, v in errs.items()})


def test_decode_public_default_size_and_groups_alias(reference_dir):
    tok, spec, io = _decode_case(reference_dir, "decode_public1")
    noise = io["noise_32x32"]
    # groups=k is clip_steps=k when S == K
    assert torch.equal(tok.decode(io["codes"], noise=noise, groups=2), tok.decode(io["codes"], noise=noise, clip_steps=2))
    # the config's num_denoising_steps is the default
    assert torch.equal(tok.decode(io["codes"], noise=noise), tok.decode(io["codes"], noise=noise, steps=4))


@pytest.fixture(scope="module")
def ar_public(reference_dir):
    cfg = json.load(open(reference_dir / "ar_public1.json"))["model"]
    ar = dar_fast.load_ar(str(reference_dir / "ar_public1.weights.safetensors"), config=cfg)
    return ar, load_file(reference_dir / "ar_public1.io.safetensors")


def test_ar_public_rope_base_and_gqa(ar_public):
    """rope_base 1000 and one KV head for two query heads: teacher forcing, the null class, and the KV cache."""
    ar, io = ar_public
    assert ar.cfg.rope_base == 1000.0 and ar.cfg.kv_heads == 1
    tokens, labels = io["tokens"], io["class_labels"]
    with torch.no_grad():
        assert rel_err(ar(tokens[:, :-1], labels), io["teacher_logits"]) < TOL
        null = torch.full_like(labels, ar.null_class)
        assert rel_err(ar(tokens[:, :-1], null), io["null_teacher_logits"]) < TOL
        ar.setup_cache(labels.shape[0])
        out = [ar.prefill(labels)]
        for j in range(tokens.shape[1] - 1):
            out.append(ar.decode_one(tokens[:, j], j + 1))
    assert rel_err(torch.stack(out, 1), io["teacher_logits"]) < TOL


def test_ar_rope_base_matters(reference_dir, ar_public):
    """The same weights with the default base 10000 are far off: rope_base is used, not dropped."""
    ar, io = ar_public
    cfg = dict(json.load(open(reference_dir / "ar_public1.json"))["model"], rope_base=10000.0)
    wrong = dar_fast.load_ar(str(reference_dir / "ar_public1.weights.safetensors"), config=cfg)
    with torch.no_grad():
        assert rel_err(wrong(io["tokens"][:, :-1], io["class_labels"]), io["teacher_logits"]) > 1e-2
