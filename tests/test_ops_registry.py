"""dar_fast.ops: the one table of op implementations and the one reading of the backend switches."""
import importlib
import re
from pathlib import Path

import pytest
import torch

from dar_fast import attention, ops

ROOT = Path(__file__).resolve().parents[1]


def test_every_op_names_a_kernel_and_a_reference_that_exist():
    for name, spec in ops.OPS.items():
        mod = importlib.import_module(f"dar_fast.kernels.{spec.module}")
        assert callable(ops.reference(name)) and ops.reference(name) is getattr(mod, spec.reference)
        assert spec.runs in ("triton", "compiled"), name
        if spec.runs == "triton":
            assert callable(getattr(mod, spec.kernel)), name
        else:
            assert callable(getattr(mod, spec.available)), name


def test_documented_op_switches_are_the_table():
    doc = (ROOT / "docs" / "environment.md").read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| `DAR_FAST_BACKEND_<OP>`"))
    assert set(re.findall(r"`([A-Z_]+)`", row.split("`<OP>` is", 1)[1])) == {k.upper() for k in ops.OPS}


def test_public_names_resolve_to_the_kernel_modules():
    from dar_fast.kernels import flow_step, sample_tokens
    assert ops.flow_step is flow_step.flow_step and ops.sample_tokens is sample_tokens.sample_tokens
    assert ops.images_to_uint8 is flow_step.images_to_uint8_ref
    with pytest.raises(AttributeError):
        ops.no_such_op


def test_switch_resolution(monkeypatch):
    for var in ("DAR_FAST_BACKEND", "DAR_FAST_BACKEND_SWIGLU", "TRITON_INTERPRET"):
        monkeypatch.delenv(var, raising=False)
    x = torch.randn(3, 6)
    assert ops.requested("swiglu") == "auto" and not ops.use_kernel("swiglu", x)   # CPU tensor: the reference
    monkeypatch.setenv("DAR_FAST_BACKEND", "torch")
    monkeypatch.setenv("DAR_FAST_BACKEND_SWIGLU", "Triton ")                       # the per-op switch wins
    assert ops.requested("swiglu") == "triton" and ops.requested("rms_norm") == "torch"
    monkeypatch.setenv("DAR_FAST_BACKEND_SWIGLU", "cuda")
    with pytest.raises(ValueError, match="DAR_FAST_BACKEND_SWIGLU='cuda'"):
        ops.requested("swiglu")
    with pytest.raises(KeyError):
        ops.use_kernel("no_such_op", x)


def test_attention_package_choice(monkeypatch):
    q = torch.randn(1, 5, 2, 8)
    monkeypatch.delenv("DAR_FAST_ATTENTION", raising=False)
    assert ops.attention_backend() == "auto" and ops.attention_impl(q) == "sdpa"      # CPU: always SDPA
    monkeypatch.setattr(attention, "_flash", lambda: None)
    monkeypatch.setenv("DAR_FAST_ATTENTION", "flash")
    with pytest.raises(RuntimeError, match="pip install flash-attn"):
        ops.attention_impl(q)
    monkeypatch.setattr(attention, "_flash", lambda: object())                       # installed: still SDPA on CPU
    assert ops.attention_backend() == "flash" and ops.attention_impl(q) == "sdpa"
