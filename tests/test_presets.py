"""Presets equal the released state dicts key for key, shape for shape, parameter for parameter."""
import json

import pytest
import torch

from dar_fast.config import ar_config, tokenizer_config
from dar_fast.models import ARModel, Tokenizer

AR_COUNTS = {"D-AR-B": 110_888_448, "D-AR-L": 342_910_976, "D-AR-XL": 774_699_520, "D-AR-XXL": 1_410_972_672}


@pytest.fixture(scope="module")
def manifest(reference_dir):
    return json.load(open(reference_dir / "official_state_dict_manifest.json"))


def _shapes(model):
    return {k: list(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("preset", sorted(AR_COUNTS))
def test_ar_preset_matches_manifest(manifest, preset):
    entry = manifest["GPT-" + preset.split("-")[-1]]
    with torch.device("meta"):      # shapes only: XXL would take 5.6 GB in float32
        model = ARModel(ar_config(preset))
    assert _shapes(model) == entry["state_dict"]
    assert model.num_params() == entry["num_params"] == AR_COUNTS[preset]
    # the preset carries the released config values
    cfg = ar_config(preset)
    for k, v in entry["config"].items():
        assert getattr(cfg, k) == v, k


def test_tokenizer_v1_matches_manifest(manifest):
    entry = manifest["tokenizer_v1"]
    with torch.device("meta"):
        tok = Tokenizer(tokenizer_config("tokenizer_v1"))
    assert _shapes(tok) == entry["state_dict"]
    assert tok.num_params() == entry["num_params"] == 307_444_672
    assert tok.num_params(include_repa=False) == entry["num_params_without_repa_out"]


def test_released_config_dict_gives_the_preset(manifest):
    released = manifest["tokenizer_v1"]["config"]
    a, b = tokenizer_config(released), tokenizer_config("tokenizer_v1")
    assert a.to_dict() == b.to_dict()
    assert ar_config(manifest["GPT-XL"]["config"]).to_dict() == ar_config("D-AR-XL").to_dict()


def test_unknown_preset_and_keys_are_clear_errors():
    with pytest.raises(ValueError, match="unknown AR preset"):
        ar_config("D-AR-XXXL")
    with pytest.raises(ValueError, match="unknown keys.*bogus"):
        tokenizer_config({"bogus": 1})
    with pytest.raises(ValueError, match="num_all_queries"):
        tokenizer_config({"num_all_queries": 250})
