"""The engine decode step's shortcuts compute the model's arithmetic bit for bit (float32, CPU)."""
import pytest
import torch

from dar_fast.engine_graphs import rope_pair_tables, rotate_pairs
from dar_fast.models.ar import rms_norm
from dar_fast.models.layers import rope_table, rotate


def _released_rms_norm(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w


@pytest.mark.parametrize("rows,dim", [(1, 7), (3, 127), (17, 333), (2, 1280)])
def test_rms_norm_float32_is_the_released_formula_bit_for_bit(rows, dim):
    x = torch.randn(rows, dim) * 3.0
    w = torch.randn(dim)
    with torch.no_grad():
        assert torch.equal(rms_norm(x, w, 1e-5), _released_rms_norm(x, w, 1e-5))
        assert torch.equal(rms_norm(x[:, None], w, 1e-6), _released_rms_norm(x[:, None], w, 1e-6))


def test_rms_norm_half_keeps_the_released_rounding():
    x = torch.randn(5, 96).to(torch.bfloat16)
    w = torch.randn(96).to(torch.bfloat16)
    assert torch.equal(rms_norm(x, w, 1e-5), _released_rms_norm(x, w, 1e-5))


@pytest.mark.parametrize("rows,heads,hd,length", [(1, 1, 2, 3), (3, 5, 18, 41), (2, 7, 64, 257)])
def test_rotate_pairs_equals_rotate_bit_for_bit(rows, heads, hd, length):
    cos, sin = rope_table(torch.arange(length), hd, 10000.0)
    a, b = rope_pair_tables(cos, sin)
    slot = torch.tensor([length - 2])
    x = torch.randn(rows, heads, 1, hd) * 4.0
    got = rotate_pairs(x, a.index_select(0, slot), b.index_select(0, slot))
    # the model's layout: (B, T, H, hd) with table rows (T, hd/2)
    want = rotate(x.transpose(1, 2), cos[slot], sin[slot]).transpose(1, 2)
    assert torch.equal(got, want)
