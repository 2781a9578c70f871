"""Precision modes ("released": AR bf16 + tokenizer float32/TF32; "fast": bf16), Pipeline.decode with steps/solver,
and `dar-fast fid` recording steps, solver, precision and weight sets in its manifest."""
import json

import numpy as np
import pytest
import torch

import dar_fast
from dar_fast.api import resolve_precision
from dar_fast.errors import UsageError
from dar_fast.pipeline import Pipeline
from helpers import tiny_ar, tiny_tokenizer


def test_resolve_precision():
    bf, f32 = torch.bfloat16, torch.float32
    assert resolve_precision("released", "cuda") == (f32, bf, True)
    assert resolve_precision("fast", "cuda") == (bf, bf, False)
    assert resolve_precision(None, "cuda") == (bf, bf, False)            # the previous default, unchanged
    for p in ("released", "fast", None):
        assert resolve_precision(p, "cpu") == (f32, f32, False)           # CPU: float32 unless dtype is given
    assert resolve_precision("fast", "cpu", torch.float16) == (torch.float16, torch.float16, False)
    with pytest.raises(UsageError, match="precision must be one of"):
        resolve_precision("half", "cpu")


def test_from_pretrained_records_precision_and_weights(one_thread):
    pipe = Pipeline.from_pretrained("digits", device="cpu", precision="released")
    assert pipe.precision == dict(mode="released", tokenizer_dtype="float32", ar_dtype="float32", tf32=False)
    assert pipe.tok.dtype == torch.float32 and pipe.tok.loaded_weights == "model"
    mixed = Pipeline(pipe.tok, dar_fast.load_ar(dar_fast.assets.digits_paths()[1], dtype=torch.bfloat16))
    assert mixed.precision["ar_dtype"] == "bfloat16" and mixed.precision["tokenizer_dtype"] == "float32"
    out = mixed.sample([1, 2], seed=0, steps=3)
    assert out.images.shape == (2, 32, 32, 3)


@pytest.mark.parametrize("steps,solver", [(3, "euler"), (6, "adams2")])
def test_pipeline_decode_equals_sample(steps, solver, one_thread):
    """pipe.decode(tokens, steps, solver) gives sample()'s images (same keyed noise, float32 ODE)."""
    pipe = Pipeline.from_pretrained("digits", device="cpu")
    out = pipe.sample([0, 3, 7], seed=5, steps=steps, solver=solver)
    img = pipe.decode(out.tokens, seed=5, steps=steps, solver=solver)
    d = (img.int() - out.images.int()).abs()
    assert d.max() <= 1 and (d > 0).float().mean() < 0.01                 # float rounding of the fused preview
    other = pipe.decode(out.tokens, seed=5, steps=steps + 1, solver=solver)
    assert not torch.equal(other, img)


def test_fid_manifest_records_decode_and_precision(tmp_path, one_thread):
    from dar_fast.cli import main
    tok = tiny_tokenizer(seed=3)
    ar = tiny_ar(seed=4, vocab_size=tok.codebook_size, block_size=tok.num_tokens)
    dar_fast.save_tokenizer(tok, str(tmp_path / "tok.safetensors"))
    dar_fast.save_ar(ar, str(tmp_path / "ar.safetensors"))
    out = tmp_path / "s.npz"
    argv = ["fid", "--tokenizer", str(tmp_path / "tok.safetensors"), "--ar", str(tmp_path / "ar.safetensors"),
            "--num-samples", "4", "--batch-size", "4", "--cfg", "2", "--out", str(out), "--device", "cpu",
            "--steps", "6", "--solver", "euler"]
    assert main(argv) == 0
    m = json.load(open(tmp_path / "s.json"))
    settings = m.get("settings", m)
    assert settings["steps"] == 6 and settings["solver"] == "euler"
    assert settings["precision"]["mode"] == "released"                    # fid's default
    assert settings["weights"] == {"tokenizer": "model", "ar": "model"}
    assert np.load(out)["arr_0"].shape == (4, 32, 32, 3)
