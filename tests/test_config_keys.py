"""Every key of the released configs is honoured or refused by name, never silently ignored.

The key lists are those the released code reads: the tokenizer's `VQModel(config["model"])` and its
`SequentialDiffusionDecoder(config["diff_decoder"])` (config.get calls and their defaults), and the
LlamaGen `ModelArgs` dataclass of the AR model. Each key has one treatment, checked below:
  structure  a non-default value changes the model's parameters (names or shapes)
  output     same weights, a non-default value changes what the model computes
  refused    a value dar-fast cannot compute as released is an error naming the key
  training   acts in training (dropouts, drop path, checkpointing, REPA layer, init, class dropout)
  inert      the released code reads it and never uses it; accepted, no effect (that is the released behaviour)
"""
import dataclasses
import json

import pytest
import torch

import dar_fast
from dar_fast.config import ARConfig, DiffDecoderConfig, TokenizerConfig, ar_config, tokenizer_config
from dar_fast.errors import UsageError
from dar_fast.models import ARModel, Tokenizer
from helpers import randomize_

TOKENIZER_KEYS = {
    "encoder_patch_size": "structure", "encoder_dim": "structure", "decoder_dim": "structure",
    "num_encoder_layers": "structure", "num_decoder_layers": "structure", "vq_dim": "structure",
    "vq_enable": "structure", "vq_codebook_size": "structure", "num_denoising_steps": "output",
    "num_all_queries": "output", "num_query_groups": "output", "queries_per_step": "refused",
    "sampling_resolution": "output", "output_resolution": "output", "query_low_rank": "structure",
    "rope_base_len": "output", "diff_decoder": "structure",
}
DIFF_KEYS = {
    "in_dim": "refused", "out_dim": "refused", "dim": "structure", "cond_dim": "structure", "patch_size": "structure",
    "depth": "structure", "rope_base_len": "output", "grad_checkpointing": "training", "mlp_head": "structure",
    "share_time_encoding": "structure", "repa_layer": "training", "data_std": "output", "time_shift": "output",
    "cfg": "inert",
}
AR_KEYS = {
    "dim": "structure", "n_layer": "structure", "n_head": "output", "n_kv_head": "structure",
    "multiple_of": "structure", "ffn_dim_multiplier": "structure", "rope_base": "output", "norm_eps": "output",
    "initializer_range": "training", "token_dropout_p": "training", "attn_dropout_p": "training",
    "resid_dropout_p": "training", "ffn_dropout_p": "training", "drop_path_rate": "training",
    "num_classes": "structure", "caption_dim": "inert", "class_dropout_prob": "training", "model_type": "refused",
    "vocab_size": "structure", "cls_token_num": "refused", "block_size": "output", "max_batch_size": "inert",
    "max_seq_len": "inert",
}

BASE_TOK = dict(encoder_patch_size=8, num_encoder_layers=1, num_decoder_layers=1, query_low_rank=True, encoder_dim=64,
                decoder_dim=64, vq_dim=8, vq_codebook_size=32, num_denoising_steps=4, num_query_groups=4,
                num_all_queries=16, queries_per_step=4, vq_enable=True, sampling_resolution=32,
                diff_decoder=dict(in_dim=3, out_dim=3, dim=64, cond_dim=64, patch_size=4, depth=2, data_std=0.6,
                                  time_shift=2.0, mlp_head=False, share_time_encoding=False, repa_layer=99))
# a non-default value per key (a dict: several keys that must change together)
TOK_ALT = {
    "encoder_patch_size": 4, "encoder_dim": 128, "decoder_dim": 128, "num_encoder_layers": 2, "num_decoder_layers": 2,
    "vq_dim": 16, "vq_enable": False, "vq_codebook_size": 48, "num_denoising_steps": 7,
    "num_all_queries": dict(num_all_queries=8, queries_per_step=2),
    "num_query_groups": dict(num_query_groups=2, queries_per_step=8),
    "queries_per_step": 5, "sampling_resolution": 40, "output_resolution": 16, "query_low_rank": False,
    "rope_base_len": 100.0, "diff_decoder": dict(diff_decoder=dict(depth=3)),
}
DIFF_ALT = {"in_dim": 4, "out_dim": 1, "dim": 128, "cond_dim": 32, "patch_size": 8, "depth": 1, "rope_base_len": 50.0,
            "grad_checkpointing": True, "mlp_head": dict(mlp_head=True, share_time_encoding=True),
            "share_time_encoding": True, "repa_layer": 0, "data_std": 0.5, "time_shift": 3.0, "cfg": 4.0}


def _released_config_files(reference_dir):
    """(what, model config dict) of every released-format config shipped with the reference data."""
    out = []
    for f in sorted(reference_dir.glob("*.json")):
        d = json.load(open(f))
        if f.name == "official_state_dict_manifest.json":
            out += [(f"manifest {k}", v["config"]) for k, v in d.items()]
        else:
            out.append((f.name, d["model"]))
    return out


def test_key_lists_cover_our_fields_and_every_shipped_config(reference_dir):
    ours_tok = {f.name for f in dataclasses.fields(TokenizerConfig)} - {"head_dim", "query_table_size", "repa_head"}
    ours_dd = {f.name for f in dataclasses.fields(DiffDecoderConfig)} - {"repa_dim", "repa_hidden", "repa_grid"}
    assert ours_tok == set(TOKENIZER_KEYS) and ours_dd == set(DIFF_KEYS)
    assert {f.name for f in dataclasses.fields(ARConfig)} == set(AR_KEYS)
    files = _released_config_files(reference_dir)
    assert len(files) >= 9
    for what, cfg in files:
        if "diff_decoder" in cfg:
            assert set(cfg) <= set(TOKENIZER_KEYS) and set(cfg["diff_decoder"]) <= set(DIFF_KEYS), what
            tokenizer_config(cfg)                                   # every released value loads
        else:
            assert set(cfg) <= set(AR_KEYS), what
            ar_config(cfg)


def _tok_cfg(alt=None, dd_alt=None):
    d = json.loads(json.dumps(BASE_TOK))
    if isinstance(alt, dict):
        for k, v in alt.items():
            if k == "diff_decoder":
                d["diff_decoder"].update(v)
            else:
                d[k] = v
    if dd_alt:
        d["diff_decoder"].update(dd_alt)
    return tokenizer_config(d)


def _shapes(m):
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def _tok_outputs(tok, steps=None):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    noise = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        lat = tok.encode_latents(x)
        rec = tok.reconstruct(x, noise=noise)
        cond = tok.cond_from_vectors(torch.nn.functional.normalize(lat, dim=-1))
        v = tok.net(noise, torch.full((2,), 0.3), cond[:, :tok.group_size])
    return lat, rec, v, tok.decode_size()


def _differs(a, b):
    return any((x.shape != y.shape) or not torch.allclose(x, y, atol=1e-6)
               if torch.is_tensor(x) else x != y for x, y in zip(a, b))


@pytest.mark.parametrize("key", sorted(TOKENIZER_KEYS) + [f"diff_decoder.{k}" for k in sorted(DIFF_KEYS)])
def test_tokenizer_key(key):
    nested = key.startswith("diff_decoder.")
    name = key.split(".")[-1]
    kind = DIFF_KEYS[name] if nested else TOKENIZER_KEYS[name]
    raw = DIFF_ALT[name] if nested else TOK_ALT[name]
    if nested:
        alt = dict(diff_decoder=raw if isinstance(raw, dict) else {name: raw})
    else:
        alt = raw if isinstance(raw, dict) else {name: raw}
    if kind == "refused":
        with pytest.raises(UsageError, match=name):
            _tok_cfg(alt)
        return
    base_cfg, alt_cfg = _tok_cfg(), _tok_cfg(alt)
    base = randomize_(Tokenizer(base_cfg)).eval()
    other = Tokenizer(alt_cfg).eval()
    if kind == "structure":
        assert _shapes(other) != _shapes(base)
        return
    if kind == "training":
        return _check_tokenizer_training_key(name, base, other)
    other.load_state_dict(base.state_dict(), strict=True)           # same weights
    if kind == "inert":
        assert not _differs(_tok_outputs(other), _tok_outputs(base))
    else:                                                             # output
        assert _differs(_tok_outputs(other), _tok_outputs(base)), key


def _check_tokenizer_training_key(name, base, other):
    x, t, c = torch.randn(2, 3, 32, 32), torch.rand(2), torch.randn(2, 4, 64)
    if name == "grad_checkpointing":
        # a trainer option, not the model's: train-tokenizer reads it and parallelize checkpoints the DiT blocks
        import dar_fast.training.parallelize as par
        from dar_fast.training.tokenizer_train import training_options
        plain, wanted = training_options(other.cfg)
        assert wanted and not plain.diff_decoder.grad_checkpointing
        calls = []
        orig = par.checkpoint

        def counting(*a, **k):
            calls.append(1)
            return orig(*a, **k)
        par.checkpoint = counting
        try:
            other.load_state_dict(base.state_dict())
            par.checkpoint_blocks([other.net.blocks])
            other.train()
            other.net(x.requires_grad_(), t, c).sum().backward()
            assert len(calls) == other.cfg.diff_decoder.depth        # every block recomputed in backward
            other.eval()
            with torch.no_grad():
                other.net(x, t, c)
            assert len(calls) == other.cfg.diff_decoder.depth        # never at inference
        finally:
            par.checkpoint = orig
    elif name == "repa_layer":
        # with the head: features taken before block 0 vs before block 1 differ (REPA loss in training)
        cfg0 = dataclasses.replace(other.cfg, repa_head=True)
        cfg1 = dataclasses.replace(cfg0, diff_decoder=dataclasses.replace(cfg0.diff_decoder, repa_layer=1))
        m0 = randomize_(Tokenizer(cfg0)).eval()
        m1 = Tokenizer(cfg1).eval()
        m1.load_state_dict(m0.state_dict())
        with torch.no_grad():
            r0, r1 = m0.net(x, t, c, return_repa=True)[1], m1.net(x, t, c, return_repa=True)[1]
        assert r0 is not None and not torch.allclose(r0, r1)
        assert DiffDecoderConfig().repa_layer == 8                    # released default
    else:
        raise AssertionError(name)


BASE_AR = dict(dim=64, n_layer=2, n_head=2, vocab_size=32, block_size=12, num_classes=5, token_dropout_p=0.0,
               attn_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, drop_path_rate=0.0)
AR_ALT = {"dim": 128, "n_layer": 3, "n_head": 4, "n_kv_head": 1, "multiple_of": 64, "ffn_dim_multiplier": 3.0,
          "rope_base": 100.0, "norm_eps": 0.5, "initializer_range": 0.1, "token_dropout_p": 0.5,
          "attn_dropout_p": 0.5, "resid_dropout_p": 0.5, "ffn_dropout_p": 0.5, "drop_path_rate": 0.9,
          "num_classes": 7, "caption_dim": 16, "class_dropout_prob": 0.3, "model_type": "t2i", "vocab_size": 40,
          "cls_token_num": 2, "block_size": 8, "max_batch_size": 2, "max_seq_len": 64}


def _ar_logits(ar, train=False):
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 32, (3, 7), generator=g)
    labels = torch.tensor([0, 1, 2])
    ar.train(train)
    torch.manual_seed(3)
    with torch.set_grad_enabled(train):
        out = ar(tokens, labels)
    ar.eval()
    return out


@pytest.mark.parametrize("key", sorted(AR_KEYS))
def test_ar_key(key, tmp_path):
    kind = AR_KEYS[key]
    alt = dict(BASE_AR, **{key: AR_ALT[key]})
    if kind == "refused":
        with pytest.raises(UsageError, match=key):
            ar_config(alt)
        return
    base = randomize_(ARModel(ar_config(BASE_AR))).eval()
    other = ARModel(ar_config(alt)).eval()
    if kind == "structure":
        assert _shapes(other) != _shapes(base)
        return
    if key == "initializer_range":
        torch.manual_seed(0)
        std = other.initialize_weights().tok_embeddings.weight.std().item()
        assert 0.08 < std < 0.12                                      # normal(0, initializer_range)
        return
    if key == "class_dropout_prob":
        _check_class_dropout(alt, tmp_path)
        with pytest.raises(UsageError, match="class_dropout_prob"):
            ar_config(dict(BASE_AR, class_dropout_prob=0.0))          # released: no null-class row at 0
        return
    other.load_state_dict(base.state_dict(), strict=True)
    if kind == "training":
        # a no-op at inference, active in training mode (fixed seed: the base model trains deterministically)
        assert torch.equal(_ar_logits(other), _ar_logits(base))
        assert torch.equal(_ar_logits(base, train=True), _ar_logits(base))
        assert not torch.allclose(_ar_logits(other, train=True), _ar_logits(other))
    elif kind == "inert":
        assert torch.equal(_ar_logits(other), _ar_logits(base))
    elif key == "block_size":
        assert other.num_tokens == 8 and base.num_tokens == 12
    else:                                                             # output
        assert not torch.allclose(_ar_logits(other), _ar_logits(base), atol=1e-4)


def _check_class_dropout(alt, tmp_path):
    from test_train_ar import write_codes

    from dar_fast.cli import build_parser
    from dar_fast.training.ar_train import ARTrainer
    from dar_fast.training.distributed import DistEnv
    cfg = tmp_path / "ar.json"
    cfg.write_text(json.dumps(dict(alt, block_size=16)))
    codes = write_codes(tmp_path / "codes", torch.randint(0, 32, (4, 1, 16)).numpy(), [0, 1, 2, 3])
    args = build_parser().parse_args(["train-ar", "--preset", str(cfg), "--codes", codes, "--out", str(tmp_path / "o"),
                                      "--steps", "1", "--batch-size", "4", "--quiet", "--device", "cpu"])
    assert ARTrainer(args, DistEnv()).class_dropout == 0.3           # the config's value, not a fixed 0.1
