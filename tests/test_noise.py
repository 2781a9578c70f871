"""Keyed Gaussian noise (kernels/noise.py, seeding.sample_noise): kernel (CPU: TRITON_INTERPRET=1) bit-identical to
the PyTorch reference, the same noise alone or in any batch, and normal."""
import math

import pytest
import torch

from dar_fast import ops
from dar_fast.kernels import noise as nm
from dar_fast.kernels.noise import keyed_normal, keyed_normal_ref, keyed_normal_triton, ndtri_f64
from dar_fast.seeding import sample_noise

from conftest import needs_triton


def keys(B):
    """Fresh random keys, including negative and > 32-bit seeds and ids (both words of the key matter)."""
    seeds = torch.randint(-2 ** 62, 2 ** 62, (B,))
    ids = torch.randint(-2 ** 40, 2 ** 40, (B,))
    return seeds, ids


@needs_triton
def test_kernel_bit_identical_to_reference(monkeypatch):
    """Interpreted (numpy float64: IEEE, no FMA); n = 3 ends inside one Philox group, 1027 spans two programs."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for B, n in ((2, 3), (3, 1027)):
        seeds, ids = keys(B)
        out = keyed_normal_triton(seeds, ids, n, "cpu")
        ref = keyed_normal_ref(seeds, ids, n)
        assert out.dtype == ref.dtype == torch.float32 and out.shape == (B, n)
        assert torch.equal(out, ref)


def test_alone_equals_in_batch(backend):
    """A sample's noise is the same alone, inside a batch, at any batch position."""
    seeds, ids = keys(3)
    seeds[2] = seeds[0]                               # same seed, other id: still different noise
    batch = sample_noise(seeds, ids, (3, 7, 5))
    assert batch.shape == (3, 3, 7, 5) and batch.dtype == torch.float32
    perm = torch.tensor([2, 0, 1])
    assert torch.equal(sample_noise(seeds[perm], ids[perm], (3, 7, 5)), batch[perm])
    assert torch.equal(sample_noise(seeds[1:2], ids[1:2], (3, 7, 5))[0], batch[1])
    assert not torch.equal(batch[0], batch[2])


def test_element_index_layout():
    """Element i depends on i only: a longer draw extends a shorter one (row-major over the shape)."""
    seeds, ids = keys(2)
    a = keyed_normal(seeds, ids, 37)
    b = keyed_normal(seeds, ids, 101)
    assert torch.equal(a, b[:, :37])
    assert torch.equal(sample_noise(seeds, ids, (1, 101)).view(2, 101), b)


def test_ndtri_matches_torch():
    """AS241 in float64 (the fixed-sequence version) against torch.special.ndtri: relative error < 4e-15."""
    u = torch.cat([torch.rand(20000, dtype=torch.float64), torch.tensor([0.075, 0.925, 0.5, 0.0749999, 0.9250001],
                                                                       dtype=torch.float64)])
    u = u.clamp(2.0 ** -33, 1 - 2.0 ** -33)
    ex = torch.special.ndtri(u)
    rel = ((ndtri_f64(u) - ex).abs() / ex.abs().clamp_min(1e-3)).max().item()
    assert rel < 4e-15, rel
    lo = ndtri_f64(torch.tensor([2.0 ** -33, 1 - 2.0 ** -33], dtype=torch.float64))
    assert abs(lo[0].item() + 6.3379577545537895) < 1e-12 and lo[1].item() == -lo[0].item()


def test_is_standard_normal():
    """Moments and the Kolmogorov-Smirnov distance of 2 x 40000 draws (reference path, CPU)."""
    seeds, ids = keys(2)
    z = keyed_normal_ref(seeds, ids, 40000).double().flatten()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)                       # 5 sigma
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs(((z - z.mean()) ** 4).mean().item() / z.var().item() ** 2 - 3) < 5 * math.sqrt(24 / n)
    zs, _ = z.sort()
    cdf = 0.5 * (1 + torch.erf(zs / math.sqrt(2)))
    emp = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = (cdf - emp).abs().max().item()
    assert ks < 1.95 / math.sqrt(n), ks                                   # KS critical value at 0.1 %
    a, b = keyed_normal_ref(seeds, ids, 40000)
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 5 / math.sqrt(40000)


def test_sample_noise_device_and_errors():
    seeds, ids = keys(2)
    out = sample_noise(seeds, ids, (3, 4, 4), device="cpu")
    assert out.device.type == "cpu" and out.shape == (2, 3, 4, 4)
    assert torch.equal(ops.sample_noise(seeds, ids, (3, 4, 4)), out)
    with pytest.raises(ValueError, match="seeds but"):
        keyed_normal(seeds, ids[:1], 4)
    with pytest.raises(TypeError, match="integer"):
        keyed_normal(seeds.double(), ids, 4)
    with pytest.raises(ValueError, match="at most 2\\^34"):
        keyed_normal(seeds, ids, 2 ** 34 + 1)
    assert keyed_normal(seeds, ids, 0).shape == (2, 0)


@needs_triton
def test_dispatch(monkeypatch):
    calls = []
    real = nm.keyed_normal_triton
    monkeypatch.setattr(nm, "keyed_normal_triton", lambda *a: calls.append(1) or real(*a))
    seeds, ids = keys(1)
    monkeypatch.setenv("DAR_FAST_BACKEND", "torch")
    keyed_normal(seeds, ids, 8)
    assert not calls
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("DAR_FAST_BACKEND_NOISE", "triton")
    keyed_normal(seeds, ids, 8)
    assert calls == [1]


@pytest.mark.gpu
def test_gpu_bit_identical_to_cpu(monkeypatch):
    """The CUDA kernel gives the CPU reference's bits: 4 images of 3x256x256, alone and batched."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("DAR_FAST_BACKEND", raising=False)
    seeds, ids = keys(4)
    gpu = sample_noise(seeds, ids, (3, 256, 256), device="cuda")
    assert gpu.is_cuda
    assert torch.equal(gpu.cpu(), sample_noise(seeds, ids, (3, 256, 256)))
    assert torch.equal(sample_noise(seeds[1:2], ids[1:2], (3, 256, 256), device="cuda")[0], gpu[1])


def test_philox_is_the_token_samplers():
    """The noise's Philox (numpy uint64) equals the token sampler's reference Philox4x32-10 on random
    counters and keys (whose own test pins it to Random123)."""
    import numpy as np
    from dar_fast.kernels.noise import philox_np
    from dar_fast.kernels.sample_tokens import philox4x32_10
    c0 = torch.randint(0, 2 ** 32, (257,))
    c1, c2, c3, k0, k1 = torch.randint(0, 2 ** 32, (5,)).tolist()
    ref = philox4x32_10(torch.stack([c0, torch.full_like(c0, c1), torch.full_like(c0, c2), torch.full_like(c0, c3)], 1),
                        torch.tensor([k0, k1]))
    got = philox_np(c0.numpy().astype(np.uint64), c1, c2, c3, k0, k1)
    assert torch.equal(torch.from_numpy(np.stack(got, 1).astype(np.int64)), ref)
