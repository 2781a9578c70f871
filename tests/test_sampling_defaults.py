"""Recommended sampling settings travel with a model: checkpoint metadata, the JSON beside it, presets; the
Pipeline and the CLI use them for what the caller leaves out and say which values were used."""
import json

import pytest
import torch

import dar_fast
from dar_fast import defaults
from dar_fast.errors import UsageError
from dar_fast.pipeline import Pipeline
from helpers import tiny_ar, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _models(tmp_path, sampling=None):
    tok = tiny_tokenizer(seed=3)
    ar = tiny_ar(seed=4, vocab_size=tok.codebook_size, block_size=tok.num_tokens)
    if sampling is not None:
        ar.sampling = sampling
    dar_fast.save_tokenizer(tok, str(tmp_path / "tok.safetensors"))
    dar_fast.save_ar(ar, str(tmp_path / "ar.safetensors"))
    return str(tmp_path / "tok.safetensors"), str(tmp_path / "ar.safetensors")


def test_digits_model_samples_at_its_own_cfg():
    """The embedded model carries cfg 3.0 (96.5% recognised at 3.0; 90.5-91.5% at the library default 4.0)."""
    pipe = Pipeline.from_pretrained("digits", device="cpu")
    assert pipe.defaults["cfg"] == 3.0
    labels = [0, 3, 7, 9]
    out = pipe.sample(labels, seed=11)
    assert out.settings["cfg"] == 3.0 and out.settings["temperature"] == 1.0
    assert out.settings["steps"] == pipe.tok.check_steps(None) and out.settings["solver"] == "adams2"
    assert torch.equal(out.tokens, pipe.sample(labels, cfg=3.0, seed=11).tokens)
    other = pipe.sample(labels, cfg=4.0, seed=11)                        # a given value wins
    assert other.settings["cfg"] == 4.0 and not torch.equal(other.tokens, out.tokens)


def test_metadata_round_trip_and_precedence(tmp_path):
    tok_p, ar_p = _models(tmp_path, sampling={"cfg": [1.5, 3.0], "top_k": 7})
    ar = dar_fast.load_ar(ar_p)
    assert ar.sampling == {"cfg": [1.5, 3.0], "top_k": 7}
    pipe = Pipeline.from_pretrained(tok_p, ar_p, device="cpu")
    s = pipe.settings()
    assert s["cfg"] == (1.5, 3.0) and s["top_k"] == 7 and s["top_p"] == 1.0 and s["temperature"] == 1.0
    assert pipe.settings(top_k=0, cfg=2.5)["top_k"] == 0 and pipe.settings(cfg=2.5)["cfg"] == 2.5
    labels = [0, 1, 2]
    a = pipe.sample(labels, seed=3)
    b = pipe.sample(labels, seed=3, cfg=(1.5, 3.0), top_k=7)
    assert torch.equal(a.tokens, b.tokens) and a.settings == b.settings
    # the JSON beside the checkpoint overrides the metadata; the caller's config= overrides both
    side = tmp_path / "ar.json"
    side.write_text(json.dumps({"kind": "ar", "model": ar.cfg.to_dict(), "sampling": {"temperature": 0.9}}))
    assert dar_fast.load_ar(ar_p).sampling == {"cfg": [1.5, 3.0], "top_k": 7, "temperature": 0.9}
    cfg_file = tmp_path / "my.json"
    cfg_file.write_text(json.dumps({"model": ar.cfg.to_dict(), "sampling": {"cfg": 1.25}}))
    assert dar_fast.load_ar(ar_p, config=str(cfg_file)).sampling["cfg"] == 1.25


def test_no_recommendation_uses_library_defaults(tmp_path):
    tok_p, ar_p = _models(tmp_path)
    pipe = Pipeline.from_pretrained(tok_p, ar_p, device="cpu")
    assert pipe.defaults == {}
    s = pipe.settings()
    assert {k: s[k] for k in defaults.LIBRARY_DEFAULTS} == defaults.LIBRARY_DEFAULTS


def test_presets_carry_the_papers_schedules():
    for name, end in (("D-AR-L", 8.0), ("D-AR-XL", 10.0), ("D-AR-XXL", 11.0), ("GPT-XL", 10.0)):
        got = defaults.model_defaults(None, config=name)
        assert got["cfg"] == [1.1, end] and got["temperature"] == 1.0 and got["top_k"] == 0 and got["top_p"] == 1.0
    # a released AR .pt names its model in the args Namespace
    import argparse
    assert defaults.model_defaults(None, ckpt_config=argparse.Namespace(gpt_model="GPT-L"))["cfg"] == [1.1, 8.0]
    assert defaults.model_defaults(None, config="D-AR-B") == {}        # the paper gives no FID setting for B


@pytest.mark.parametrize("bad, word", [({"cfg": "high"}, "sampling.cfg"), ({"cfg": [1, 2, 3]}, "sampling.cfg"),
                                       ({"temperature": 0}, "sampling.temperature"), ({"top_k": 1.5}, "top_k"),
                                       ({"top_p": 2}, "top_p"), ({"steps": 0}, "steps"),
                                       ({"solver": "rk4"}, "solver"), ({"guidance": 2}, "guidance")])
def test_bad_recommendations_are_named(tmp_path, bad, word):
    tok_p, ar_p = _models(tmp_path)
    side = tmp_path / "ar.json"
    side.write_text(json.dumps({"sampling": bad}))
    with pytest.raises(UsageError, match=word) as e:
        dar_fast.load_ar(ar_p)
    assert str(side) in str(e.value)


def test_sample_cli_uses_and_reports_the_models_settings(tmp_path, capsys):
    from dar_fast.cli import main
    tok_p, ar_p = _models(tmp_path, sampling={"cfg": 1.75})
    out = tmp_path / "out"
    assert main(["sample", "--tokenizer", tok_p, "--ar", ar_p, "--labels", "1", "--out", str(out),
                 "--no-progress", "--device", "cpu"]) == 0          # CPU on GPU machines too (no compile there)
    printed = capsys.readouterr().out
    assert "cfg 1.75 (model)" in printed and "temperature 1.0 (default)" in printed
    assert json.loads((out / "settings.json").read_text())["sampling"]["cfg"] == 1.75
