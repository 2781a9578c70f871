"""Finite numbers and integers only: weights, sampling arguments, labels, prefix tokens and seeds."""
import numpy as np
import pytest
import torch

import dar_fast
from dar_fast.errors import UsageError
from dar_fast.pipeline import Pipeline
from dar_fast.sampler import reference_sample
from dar_fast.sampling_args import MIN_TEMPERATURE
from dar_fast.seeding import SEED_MAX, SEED_MIN, check_seed, resolve_keys
from helpers import tiny_ar, tiny_tokenizer


@pytest.fixture(scope="module")
def models():
    tok = tiny_tokenizer(seed=1)
    ar = tiny_ar(seed=2, vocab_size=tok.codebook_size, block_size=tok.num_tokens)
    return tok, ar, Pipeline(tokenizer=tok, ar=ar)


# ------------------------------------------------------------------------------------------ weights

@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_refused_with_the_tensor_name(tmp_path, value):
    tok = tiny_tokenizer(seed=1)
    ar = tiny_ar(seed=2, vocab_size=tok.codebook_size, block_size=tok.num_tokens)
    name = "layers.1.attention.wqkv.weight" if "layers.1.attention.wqkv.weight" in ar.state_dict() else \
        [k for k, v in ar.state_dict().items() if v.is_floating_point() and v.dim() == 2][-1]
    with torch.no_grad():
        ar.state_dict()[name].view(-1)[7] = value
    path = str(tmp_path / "ar.safetensors")
    dar_fast.save_ar(ar, path)
    kind = "NaN" if value != value else "inf"
    with pytest.raises(UsageError, match=f"non-finite weights in 1 tensor.*{name} \\({kind}\\)"):
        dar_fast.load_ar(path)


def test_non_finite_bfloat16_and_tokenizer_weights_refused(tmp_path):
    tok = tiny_tokenizer(seed=1).to(torch.bfloat16)
    sd = tok.state_dict()
    name = [k for k, v in sd.items() if v.is_floating_point() and v.numel() > 3][0]
    with torch.no_grad():
        sd[name].view(-1)[2] = float("nan")
    path = str(tmp_path / "tok.safetensors")
    dar_fast.save_tokenizer(tok, path)
    with pytest.raises(UsageError, match=f"{name} \\(NaN\\)"):
        dar_fast.load_tokenizer(path)


def test_integer_weights_refused(tmp_path):
    from dar_fast.checkpoint import load_strict
    ar = tiny_ar(seed=2)
    sd = {k: v.clone() for k, v in ar.state_dict().items()}
    name = next(k for k, v in sd.items() if v.is_floating_point())
    sd[name] = (sd[name] * 10).to(torch.int32)
    with pytest.raises(UsageError, match=f"non-floating weights.*{name} \\(torch.int32"):
        load_strict(tiny_ar(seed=3), sd)


def test_finite_weights_load_unchanged():
    from dar_fast.checkpoint import load_strict
    src, dst = tiny_ar(seed=2), tiny_ar(seed=3)
    sd = src.state_dict()
    load_strict(dst, sd)
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in sd.items())


# ------------------------------------------------------------------------------------------ sampling arguments

@pytest.mark.parametrize("kw,msg", [
    (dict(cfg=float("nan")), "cfg must be finite"),
    (dict(cfg=float("inf")), "cfg must be finite"),
    (dict(cfg=1e30), "cfg scale must be >= 0 and <= 1000"),
    (dict(cfg=(1.0, float("nan"))), "cfg must be finite"),
    (dict(cfg=(1.0, 2.0, 3.0)), "start, end"),
    (dict(cfg="abc"), "cfg must be a number"),
    (dict(temperature=1e-30), "temperature must be >= 1e-06"),
    (dict(temperature=0.0), "temperature must be >= 1e-06"),
    (dict(temperature=float("nan")), "temperature must be finite"),
    (dict(temperature=float("inf")), "temperature must be finite"),
    (dict(top_p=float("nan")), "top_p must be finite"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(top_k=2.5), "top_k must be an integer >= 0"),
])
def test_bad_sampling_arguments_refused(models, kw, msg):
    tok, ar, pipe = models
    with pytest.raises(UsageError, match=msg):
        pipe.sample([0, 1], **kw)
    with pytest.raises(UsageError, match=msg):
        reference_sample(tok, ar, [0, 1], **kw)


def test_smallest_temperature_is_finite_and_greedy(models):
    tok, ar, pipe = models
    a = pipe.sample([0, 1, 2], cfg=2.0, temperature=MIN_TEMPERATURE, seed=1)
    b = pipe.sample([0, 1, 2], cfg=2.0, temperature=MIN_TEMPERATURE, seed=2)
    assert torch.equal(a.tokens, b.tokens)          # greedy: the key no longer matters
    assert a.images.dtype == torch.uint8


@pytest.mark.parametrize("labels,msg", [
    ([0.0, 1.0], "labels must be integers, got float64"),
    ([1.7], "labels must be integers"),
    (torch.tensor([0.0, 1.0]), "labels must be integers, got a torch.float32 tensor"),
    ([True, False], "labels must be integers, got booleans"),
    (torch.tensor([True]), "labels must be integers, got a torch.bool tensor"),
    (np.array([1, 2], dtype=np.float32), "labels must be integers, got float32"),
    ([2 ** 70], "within int64"),
])
def test_labels_must_be_integers(models, labels, msg):
    tok, ar, pipe = models
    with pytest.raises(UsageError, match=msg):
        pipe.sample(labels)


def test_integer_label_types_accepted_alike(models):
    tok, ar, pipe = models
    ref = pipe.sample([0, 3], cfg=2.0).tokens
    for labels in (np.array([0, 3], dtype=np.uint8), [np.int64(0), np.int32(3)], torch.tensor([0, 3], dtype=torch.int16)):
        assert torch.equal(pipe.sample(labels, cfg=2.0).tokens, ref)


def test_prefix_tokens_must_be_integers(models):
    tok, ar, pipe = models
    with pytest.raises(UsageError, match="prefix_tokens must be integers"):
        pipe.sample([0], prefix_tokens=torch.tensor([[1.5, 2.0]]))
    with pytest.raises(UsageError, match="prefix_tokens must be integers, got booleans"):
        pipe.sample([0], prefix_tokens=[[True, False]])
    a = pipe.sample([0], cfg=2.0, prefix_tokens=np.array([[3, 4]], dtype=np.int32)).tokens
    assert a[0, :2].tolist() == [3, 4]


# ------------------------------------------------------------------------------------------ seeds

def test_seed_range_and_types(models):
    tok, ar, pipe = models
    assert check_seed(np.int64(5)) == 5 and check_seed(np.uint32(7)) == 7 and check_seed(torch.tensor(9)) == 9
    assert check_seed(SEED_MAX) == SEED_MAX and check_seed(SEED_MIN) == SEED_MIN
    for bad, msg in ((2 ** 63, "must fit in int64"), (-(2 ** 63) - 1, "must fit in int64"), (1.0, "must be an integer"),
                     (True, "must be an integer"), (np.uint64(2 ** 64 - 1), "must fit in int64")):
        with pytest.raises(UsageError, match=msg):
            check_seed(bad)
    with pytest.raises(UsageError, match="seed must be integers"):
        resolve_keys([1.5, 2.0], 2)
    # a NumPy seed gives exactly what the equal Python int gives; the largest seed samples
    assert torch.equal(pipe.sample([1, 2], cfg=2.0, seed=np.int64(11)).tokens, pipe.sample([1, 2], cfg=2.0, seed=11).tokens)
    assert pipe.sample([1], cfg=2.0, seed=SEED_MAX).tokens.shape == (1, tok.num_tokens)
    with pytest.raises(UsageError, match="must fit in int64"):
        pipe.sample([1], seed=2 ** 63)


# ------------------------------------------------------------------------------------------ config sizes

@pytest.mark.parametrize("kw,msg", [
    (dict(num_query_groups=0), "num_query_groups must be a positive integer, got 0"),
    (dict(encoder_patch_size=0), "encoder_patch_size must be a positive integer"),
    (dict(vq_codebook_size=-4), "vq_codebook_size must be a positive integer"),
    (dict(num_decoder_layers=-1), "num_decoder_layers must be an integer >= 0"),
    (dict(diff_decoder=dict(patch_size=0)), "diff_decoder: patch_size must be a positive integer"),
])
def test_tokenizer_config_sizes_positive(kw, msg):
    with pytest.raises(UsageError, match=msg):
        tiny_tokenizer(**kw)


@pytest.mark.parametrize("kw", [dict(n_layer=0), dict(vocab_size=0), dict(block_size=-1), dict(num_classes=0)])
def test_ar_config_sizes_positive(kw):
    with pytest.raises(UsageError, match=f"AR config: {next(iter(kw))} must be a positive integer"):
        tiny_ar(**kw)
