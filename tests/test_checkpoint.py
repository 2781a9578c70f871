"""Checkpoint loading: released wrappers, compile prefixes, the Namespace, safetensors, strict errors."""
import argparse
import json

import pytest
import torch

import dar_fast
from dar_fast.checkpoint import CheckpointMismatch
from helpers import tiny_ar, tiny_tokenizer, tiny_tokenizer_config


def _same(m1, m2):
    s1, s2 = m1.state_dict(), m2.state_dict()
    return set(s1) == set(s2) and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_released_style_tokenizer_pt(tmp_path):
    tok = tiny_tokenizer(repa_head=True, diff_decoder=dict(repa_layer=1, repa_hidden=32, repa_dim=16, repa_grid=4))
    cfg = {"model": tok.cfg.to_dict()}
    sd = {"_orig_mod." + k: v for k, v in tok.state_dict().items()}
    path = tmp_path / "tok.pt"
    torch.save({"config": cfg, "ema": sd, "model": {k: v * 0 for k, v in sd.items()},
                "args": argparse.Namespace(lr=1e-4, name="x")}, path)
    loaded = dar_fast.load_tokenizer(str(path))
    assert _same(loaded, tok)      # the EMA weights, not the raw ones


@pytest.mark.parametrize("wrapper", ["model", "module", "state_dict", "bare"])
def test_released_style_ar_pt(tmp_path, wrapper):
    ar = tiny_ar()
    sd = {"_orig_mod." + k: v for k, v in ar.state_dict().items()}
    sd["layers.0.attention.kv_cache.k_cache"] = torch.zeros(2, 2, 24, 32)   # runtime buffers in released files
    obj = sd if wrapper == "bare" else {wrapper: sd, "steps": 10, "args": argparse.Namespace(gpt_model="GPT-B")}
    path = tmp_path / "ar.pt"
    torch.save(obj, path)
    loaded = dar_fast.load_ar(str(path), config=ar.cfg.to_dict())
    assert _same(loaded, ar)


def test_namespace_allowed_but_nothing_broader(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": tiny_ar().state_dict(), "extra": __import__("pathlib").PurePosixPath("x"), "args": argparse.Namespace()}, path)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        dar_fast.load_ar(str(path), config=tiny_ar().cfg.to_dict())


def test_missing_repa_head_loads_for_inference():
    tok = tiny_tokenizer()
    cfg = tiny_tokenizer_config(repa_head=True, diff_decoder=dict(repa_layer=1))
    loaded = dar_fast.load_tokenizer(tok.state_dict(), config=cfg)
    assert loaded.net.repa_out is None
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded.encode(x), tok.encode(x))


def test_mismatch_lists_missing_unexpected_misshaped():
    tok = tiny_tokenizer()
    sd = dict(tok.state_dict())
    del sd["patchify.bias"]
    sd["not_a_weight"] = torch.zeros(1)
    sd["decoder_embedding.weight"] = torch.zeros(7, 3)
    with pytest.raises(CheckpointMismatch) as e:
        dar_fast.load_tokenizer(sd, config=tok.cfg)
    msg = str(e.value)
    assert "missing (1): patchify.bias" in msg and "unexpected (1): not_a_weight" in msg
    assert "decoder_embedding.weight: checkpoint (7, 3)" in msg


def test_config_mismatch_is_an_error():
    ar = tiny_ar()
    with pytest.raises(CheckpointMismatch, match="mis-shaped"):
        dar_fast.load_ar(ar.state_dict(), config=dict(ar.cfg.to_dict(), dim=96, n_head=3))


def test_safetensors_roundtrip_inside_and_beside(tmp_path):
    tok, ar = tiny_tokenizer(), tiny_ar()
    dar_fast.save_tokenizer(tok, str(tmp_path / "t.safetensors"))
    dar_fast.save_ar(ar, str(tmp_path / "a.safetensors"))
    assert _same(dar_fast.load_tokenizer(str(tmp_path / "t.safetensors")), tok)
    assert _same(dar_fast.load_ar(str(tmp_path / "a.safetensors")), ar)
    # config in a JSON beside a plain safetensors file
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in ar.state_dict().items()}, str(tmp_path / "plain.safetensors"))
    (tmp_path / "plain.json").write_text(json.dumps({"model": ar.cfg.to_dict()}))
    assert _same(dar_fast.load_ar(str(tmp_path / "plain.safetensors")), ar)
    with pytest.raises(ValueError, match="not an AR model"):
        dar_fast.load_ar(str(tmp_path / "t.safetensors"))


def test_config_from_yaml_and_json_paths(tmp_path):
    import yaml
    tok = tiny_tokenizer()
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"model": tok.cfg.to_dict()}))
    (tmp_path / "c.json").write_text(json.dumps({"model": tok.cfg.to_dict()}))
    for p in ("c.yaml", "c.json"):
        assert _same(dar_fast.load_tokenizer(tok.state_dict(), config=str(tmp_path / p)), tok)


def test_no_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no config"):
        dar_fast.load_ar(tiny_ar().state_dict())
    with pytest.raises(FileNotFoundError):
        dar_fast.load_ar(str(tmp_path / "nope.pt"))


def test_convert_cli(tmp_path):
    from dar_fast.cli import main
    ar = tiny_ar()
    torch.save({"model": {"_orig_mod." + k: v for k, v in ar.state_dict().items()}}, tmp_path / "ar.pt")
    cfgp = tmp_path / "cfg.json"
    cfgp.write_text(json.dumps(ar.cfg.to_dict()))
    out = tmp_path / "ar.safetensors"
    assert main(["convert", str(tmp_path / "ar.pt"), str(out), "--kind", "ar", "--config", str(cfgp)]) == 0
    assert _same(dar_fast.load_ar(str(out)), ar)
    assert (tmp_path / "ar.json").exists()
    # bad output name: error, nothing written
    assert main(["convert", str(tmp_path / "ar.pt"), str(tmp_path / "x.bin"), "--kind", "ar", "--config", str(cfgp)]) == 2
    assert not (tmp_path / "x.bin").exists()
