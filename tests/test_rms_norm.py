"""rms_norm (+ fused residual): Triton kernel (CPU: TRITON_INTERPRET=1) and the torch path against rms_norm_ref."""
import pytest
import torch

from dar_fast import ops
from dar_fast.kernels import rms_norm as rn
from dar_fast.kernels.rms_norm import rms_norm, rms_norm_ref

from conftest import needs_triton, rel_err


def exact(h, w, eps):
    """float64 RMSNorm of the (already rounded) h: the answer rounding errors are measured against."""
    hd = h.double()
    return hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("shape", [(3, 7, 129), (17, 64), (1, 1000), (2, 5, 3, 33)])
@pytest.mark.parametrize("with_res", [False, True])
def test_fp32_matches_ref(backend, shape, with_res):
    x = torch.randn(shape) * 3
    w = torch.randn(shape[-1])
    r = torch.randn(shape) if with_res else None
    out = ops.rms_norm(x, w, 1e-5, residual=r)
    ref = rms_norm_ref(x, w, 1e-5, r)
    if with_res:
        assert torch.equal(out[1], ref[1])                   # the new residual stream: one fp32 add, exact
        out, ref = out[0], ref[0]
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert rel_err(out, ref) < 2e-6


def test_strided_rows_and_fp32_weight(backend):
    """A (B,T,C) view with a row stride (a slice of a wider buffer) and a float32 weight on bf16 x
    (the output then promotes to float32, as the reference's product does)."""
    buf = torch.randn(2, 9, 200)
    x = buf[..., :150]
    w = torch.randn(150)
    out = rms_norm(x, w)
    assert rel_err(out, rms_norm_ref(x, w)) < 2e-6
    xb = x.bfloat16()
    out = rms_norm(xb, w)
    ref = rms_norm_ref(xb, w)
    assert out.dtype == ref.dtype == torch.float32
    assert (out - ref).abs().max() <= 2 ** -6 * ref.abs().max()      # one bf16 rounding of n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_res", [False, True])
def test_half_within_torch_error(backend, dtype, with_res):
    """Error vs float64 at most 2x torch's own in this dtype. Interpreted bf16: Triton's interpreter casts
    fp32 -> bf16 by truncation (biased, up to 1 ulp instead of 1/2) at each of the reference's roundings;
    measured y: mean 2.4x, worst 4.3x of torch's error over 30 seeds: 6x."""
    M, C = 37, 257
    x, w = torch.randn(M, C, dtype=dtype), torch.randn(C, dtype=dtype)
    r = torch.randn(M, C, dtype=dtype) if with_res else None
    out = rms_norm(x, w, residual=r)
    ref = rms_norm_ref(x, w, residual=r)
    factor = 6 if (backend == "triton" and dtype == torch.bfloat16) else 2
    if with_res:
        hx = x.double() + r.double()
        e_h, e_ht = (out[1].double() - hx).abs().max().item(), (ref[1].double() - hx).abs().max().item()
        assert e_h <= factor * e_ht + 1e-6, (e_h, e_ht)
        out, ref, h = out[0], ref[0], ref[1]
    else:
        h = x
    ex = exact(h, w, 1e-5)
    err, err_t = (out.double() - ex).abs().max().item(), (ref.double() - ex).abs().max().item()
    assert out.dtype == dtype
    assert err <= factor * err_t + 1e-6, (err, err_t)


@pytest.mark.parametrize("with_res", [False, True])
def test_grads_match_reference(backend, with_res):
    M, C = 23, 97
    x0, w0, r0 = torch.randn(M, C), torch.randn(C), torch.randn(M, C)
    gy, gh = torch.randn(M, C), torch.randn(M, C)

    def grads(fn):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        r = r0.clone().requires_grad_() if with_res else None
        out = fn(x, w, 1e-5, r)
        loss = (out[0] * gy).sum() + (out[1] * gh).sum() if with_res else (out * gy).sum()
        loss.backward()
        return [x.grad, w.grad] + ([r.grad] if with_res else [])

    for g, g_ref in zip(grads(rms_norm), grads(rms_norm_ref)):
        assert rel_err(g, g_ref) < 1e-5


def test_grad_only_weight_and_only_residual_output(backend):
    """Gradient through the h output alone (y unused) and a weight-only gradient."""
    x, r = torch.randn(5, 40, requires_grad=True), torch.randn(5, 40)
    w = torch.randn(40)
    y, h = rms_norm(x, w, residual=r)
    h.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    xw, ww = torch.randn(6, 31), torch.randn(31, requires_grad=True)
    rms_norm(xw, ww).pow(2).sum().backward()
    wr = ww.detach().clone().requires_grad_()
    rms_norm_ref(xw, wr).pow(2).sum().backward()
    assert rel_err(ww.grad, wr.grad) < 1e-5


def test_empty_and_bad_input(backend):
    assert rms_norm(torch.randn(0, 8), torch.ones(8)).shape == (0, 8)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(torch.randn(3, 8), torch.ones(7))
    with pytest.raises(ValueError, match="residual must match"):
        rms_norm(torch.randn(3, 8), torch.ones(8), residual=torch.randn(3, 9))
    with pytest.raises(TypeError, match="floating point"):
        rms_norm(torch.ones(3, 8, dtype=torch.long), torch.ones(8))


@needs_triton
def test_dispatch(monkeypatch):
    calls = []
    real = rn.rms_norm_fwd_triton
    monkeypatch.setattr(rn, "rms_norm_fwd_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, w = torch.randn(3, 8), torch.ones(8)
    monkeypatch.setenv("DAR_FAST_BACKEND", "torch")
    rms_norm(x, w)
    assert not calls
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("DAR_FAST_BACKEND_RMS_NORM", "triton")
    rms_norm(x, w)
    assert calls == [1]


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("M,C,dtype", [(128, 1024, torch.bfloat16), (4096, 1280, torch.bfloat16), (77, 333, torch.float32)])
def test_gpu_matches_ref(monkeypatch, M, C, dtype):
    monkeypatch.delenv("DAR_FAST_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, r = torch.randn(M, C, device="cuda", dtype=dtype), torch.randn(M, C, device="cuda", dtype=dtype)
    w = torch.randn(C, device="cuda", dtype=dtype)
    (y, h), (yr, hr) = rms_norm(x, w, residual=r), rms_norm_ref(x, w, residual=r)
    assert torch.equal(h, hr)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    assert rel_err(y, yr) < tol
    xg, wg = x.float().requires_grad_(), w.float().requires_grad_()
    rms_norm(xg, wg).sum().backward()
    xr, wr = x.float().requires_grad_(), w.float().requires_grad_()
    rms_norm_ref(xr, wr).sum().backward()
    assert rel_err(xg.grad, xr.grad) < 1e-4 and rel_err(wg.grad, wr.grad) < 1e-4
