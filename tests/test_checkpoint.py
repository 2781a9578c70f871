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


# ---------------------------------------------------------------------------- released trainer files, weight sets

_CONFIG_UTIL = '''
from collections.abc import MutableMapping
class Config(MutableMapping):
    """Like the released config_util.Config; reading a YAML path would create MARKER (a side effect)."""
    def __init__(self, yaml_file=None, **kwargs):
        self._data = {}
        if yaml_file:
            open(yaml_file + ".read", "w").close()
        self._data.update(kwargs)
    def __getitem__(self, k): return self._data[k]
    def __setitem__(self, k, v): self._data[k] = v
    def __delitem__(self, k): del self._data[k]
    def __iter__(self): return iter(self._data)
    def __len__(self): return len(self._data)
'''


def _released_tokenizer_pt(tmp_path, tok, raw):
    """A .pt as the released trainer writes it, with config_util.Config from a temporary module that is
    gone (file deleted, not importable) by the time it is loaded."""
    import importlib
    import sys
    mod_dir = tmp_path / "released_src"
    mod_dir.mkdir()
    (mod_dir / "config_util.py").write_text(_CONFIG_UTIL)
    sys.path.insert(0, str(mod_dir))
    try:
        config_util = importlib.import_module("config_util")
        cfg = config_util.Config(model=tok.cfg.to_dict(), train={"lr": 1e-4})
        sd = {"_orig_mod." + k: v for k, v in tok.state_dict().items()}
        obj = {"model": {k: v for k, v in raw.state_dict().items()}, "ema": sd,
               "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
               "discriminator": {"w": torch.zeros(2)}, "optimizer_disc": {"state": {}, "param_groups": []},
               "steps": 1234, "args": argparse.Namespace(lr=1e-4, ema=True), "config": cfg}
        path = tmp_path / "0001234.pt"
        torch.save(obj, path)
    finally:
        sys.path.remove(str(mod_dir))
        sys.modules.pop("config_util", None)
        (mod_dir / "config_util.py").unlink()
    with pytest.raises(ImportError):
        importlib.import_module("config_util")
    return path


def test_released_trainer_tokenizer_pt_with_config_object(tmp_path):
    tok, raw = tiny_tokenizer(seed=1), tiny_tokenizer(seed=2)
    path = _released_tokenizer_pt(tmp_path, tok, raw)
    loaded = dar_fast.load_tokenizer(str(path))
    assert loaded.loaded_weights == "ema" and _same(loaded, tok)         # released default: ema when present
    as_model = dar_fast.load_tokenizer(str(path), weights="model")
    assert as_model.loaded_weights == "model" and _same(as_model, raw)
    assert loaded.cfg == tok.cfg                                          # the config came from the Config object
    # convert keeps working on it and records the set
    from dar_fast.cli import main
    out = tmp_path / "tok.safetensors"
    assert main(["convert", str(path), str(out), "--kind", "tokenizer"]) == 0
    back = dar_fast.load_tokenizer(str(out))
    assert _same(back, tok) and back.loaded_weights == "ema"
    with pytest.raises(ValueError, match="holds one weight set"):
        dar_fast.load_tokenizer(str(out), weights="model")


def test_weights_choice_for_ar(tmp_path):
    ar_model, ar_ema = tiny_ar(seed=1), tiny_ar(seed=2)
    path = tmp_path / "ar.pt"
    torch.save({"model": ar_model.state_dict(), "ema": ar_ema.state_dict(), "steps": 5,
                "args": argparse.Namespace(gpt_model="GPT-B")}, path)
    cfg = ar_model.cfg.to_dict()
    d = dar_fast.load_ar(str(path), config=cfg)
    assert d.loaded_weights == "model" and _same(d, ar_model)           # released sample scripts load "model"
    e = dar_fast.load_ar(str(path), config=cfg, weights="ema")
    assert e.loaded_weights == "ema" and _same(e, ar_ema)
    only_model = tmp_path / "ar_model.pt"
    torch.save({"model": ar_model.state_dict()}, only_model)
    with pytest.raises(ValueError, match=r"no 'ema' weights; it holds \['model'\]"):
        dar_fast.load_ar(str(only_model), config=cfg, weights="ema")
    with pytest.raises(ValueError, match="weights must be one of"):
        dar_fast.load_ar(str(path), config=cfg, weights="best")
    # a tokenizer file with only "model" loads it by default
    tok = tiny_tokenizer()
    torch.save({"model": tok.state_dict(), "config": {"model": tok.cfg.to_dict()}}, tmp_path / "t.pt")
    assert dar_fast.load_tokenizer(str(tmp_path / "t.pt")).loaded_weights == "model"


class _Payload:
    """Unpickling this would create a file (the stand-in for any code a hostile pickle runs)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.parametrize("legacy", [False, True])
def test_hostile_pickle_refused_and_payload_never_runs(tmp_path, legacy):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    obj = {"model": tiny_ar().state_dict(), "config": {"model": {}}, "x": _Payload(str(target))}
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    assert not target.exists()
    with pytest.raises(ValueError, match="refusing to unpickle"):
        dar_fast.load_ar(str(path), config=tiny_ar().cfg.to_dict())
    assert not target.exists()
    # and the same through the released-config route: a Config whose construction would touch a file
    import pickle
    assert pickle.loads(pickle.dumps(_Payload(str(target)))) and target.exists()   # the payload is real
    target.unlink()


def test_released_config_name_runs_no_code(tmp_path):
    """A pickle that calls config_util.Config(path) (what the real class does with a YAML path: read a file)
    gets the inert stand-in, whose constructor ignores its arguments."""
    import importlib
    import sys
    mod_dir = tmp_path / "src"
    mod_dir.mkdir()
    (mod_dir / "config_util.py").write_text(_CONFIG_UTIL)
    marker = tmp_path / "cfg.yaml"
    sys.path.insert(0, str(mod_dir))
    try:
        config_util = importlib.import_module("config_util")

        class Calls(config_util.Config):
            def __reduce__(self):
                return (config_util.Config, (str(marker),))
        Calls.__module__, Calls.__qualname__ = "config_util", "Config"
        tok = tiny_tokenizer()
        path = tmp_path / "t.pt"
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(config_util, "Config", Calls, raising=True)
            torch.save({"model": tok.state_dict(), "config": Calls()}, path)
    finally:
        sys.path.remove(str(mod_dir))
        sys.modules.pop("config_util", None)
    from dar_fast.checkpoint import ReleasedConfig, _torch_load
    obj = _torch_load(str(path))
    assert not (tmp_path / "cfg.yaml.read").exists()
    assert obj["config"] == {} and not isinstance(obj["config"], ReleasedConfig)   # inert, then a plain dict
