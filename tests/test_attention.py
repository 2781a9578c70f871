"""Attention backend dispatch: SDPA by default, optional packages by name with clear errors."""
import pytest
import torch

from dar_fast import attention


def _naive(q, k, v, mask=None, causal=False):
    # (B,T,H,hd) float64 reference that does materialise the map
    s = torch.einsum("bthd,bshd->bhts", q.double(), k.double()) / q.shape[-1] ** 0.5
    if causal:
        mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).tril()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhts,bshd->bthd", s.softmax(-1), v.double())


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_path_matches_naive(causal):
    q, k, v = (torch.randn(3, 37, 5, 16) for _ in range(3))
    out = attention.attend(q, k, v, is_causal=causal)
    assert out.shape == q.shape
    assert torch.allclose(out.double(), _naive(q, k, v, causal=causal), atol=1e-5)
    mask = torch.rand(37, 37) > 0.3
    mask[:, 0] = True
    assert torch.allclose(attention.attend(q, k, v, mask=mask).double(), _naive(q, k, v, mask=mask), atol=1e-5)


def test_named_backend_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(attention, "_flash", lambda: None)
    monkeypatch.setattr(attention, "_xformers", lambda: None)
    q = torch.randn(1, 4, 1, 8)
    for name, pkg in (("flash", "flash-attn"), ("xformers", "xformers")):
        monkeypatch.setenv("DAR_FAST_ATTENTION", name)
        with pytest.raises(RuntimeError, match=pkg):
            attention.attend(q, q, q)
    monkeypatch.setenv("DAR_FAST_ATTENTION", "bogus")
    with pytest.raises(ValueError, match="DAR_FAST_ATTENTION"):
        attention.attend(q, q, q)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["flash", "xformers"])
def test_packaged_backend_matches_sdpa_on_gpu(monkeypatch, name):
    getter = attention._flash if name == "flash" else attention._xformers
    if getter() is None:
        pytest.skip(f"{name} not installed")
    q, k, v = (torch.randn(2, 300, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = _naive(q.float().cpu(), k.float().cpu(), v.float().cpu(), causal=True)
    monkeypatch.setenv("DAR_FAST_ATTENTION", "sdpa")
    sdpa = attention.attend(q, k, v, is_causal=True).float().cpu()
    monkeypatch.setenv("DAR_FAST_ATTENTION", name)
    pkg = attention.attend(q, k, v, is_causal=True).float().cpu()
    # within 2x SDPA's own bf16 error against the float64 reference
    assert (pkg.double() - ref).abs().max() <= 2 * (sdpa.double() - ref).abs().max() + 1e-3
