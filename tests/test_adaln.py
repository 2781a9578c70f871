"""adaln_modulate / gated_residual: Triton kernel (CPU: TRITON_INTERPRET=1) and the torch path against the references."""
import pytest
import torch
import torch.nn.functional as F

from dar_fast import ops
from dar_fast.kernels import adaln as am
from dar_fast.kernels.adaln import adaln_modulate, adaln_modulate_ref, gated_residual, gated_residual_ref

from conftest import needs_triton, rel_err


def params(B, T, C, kind, n, dtype=torch.float32):
    """n parameters broadcasting to (B, T, C): per-token chunks of one (B,T,n*C) buffer (the DiT's
    mod.chunk views), per sample (B,1,C) or per channel (C,)."""
    if kind == "token":
        return list((torch.randn(B, T, n * C) * 0.5).to(dtype).chunk(n, -1))
    if kind == "sample":
        return [(torch.randn(B, 1, C) * 0.5).to(dtype) for _ in range(n)]
    return [(torch.randn(C) * 0.5).to(dtype) for _ in range(n)]


@pytest.mark.parametrize("B,T,C,kind", [(3, 37, 129, "token"), (2, 5, 64, "sample"), (1, 1, 1000, "channel")])
@pytest.mark.parametrize("normalize", [True, False])
def test_modulate_fp32(backend, B, T, C, kind, normalize):
    x = torch.randn(B, T, C) * 2 + 0.5
    shift, scale = params(B, T, C, kind, 2)
    out = ops.adaln_modulate(x, shift, scale, normalize=normalize)
    ref = adaln_modulate_ref(x, shift, scale, normalize=normalize)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_err(out, ref) < 3e-6


@pytest.mark.parametrize("kind", ["token", "sample", "channel"])
@pytest.mark.parametrize("fused", [False, True])
def test_gated_residual_fp32(backend, kind, fused):
    B, T, C = 2, 19, 97
    x, y = torch.randn(B, T, C), torch.randn(B, T, C)
    gate, shift, scale = params(B, T, C, kind, 3)
    args = (shift, scale) if fused else ()
    out = ops.gated_residual(x, gate, y, *args)
    ref = gated_residual_ref(x, gate, y, *args)
    if fused:
        assert rel_err(out[0], ref[0]) < 1e-6 and rel_err(out[1], ref[1]) < 3e-6
    else:
        assert rel_err(out, ref) < 1e-6


def test_dit_block_sequence(backend):
    """The DiT block's two adaLN sites with the fused ops equal the unfused block arithmetic."""
    B, T, C = 2, 13, 64
    x = torch.randn(B, T, C)
    sa, ca, ga, sm, cm, gm = torch.randn(B, T, 6 * C).chunk(6, -1)
    attn, mlp = torch.nn.Linear(C, C), torch.nn.Linear(C, C)
    with torch.no_grad():
        h = F.layer_norm(x, (C,), eps=1e-6)
        x1 = x + ga * attn(h * (1 + ca) + sa)
        ref = x1 + gm * mlp(F.layer_norm(x1, (C,), eps=1e-6) * (1 + cm) + sm)
        x2, u = gated_residual(x, ga, attn(adaln_modulate(h, sa, ca, normalize=False)), sm, cm)
        out = gated_residual(x2, gm, mlp(u))
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_within_torch_error(backend, dtype):
    """Error vs float64 at most 2x torch's own in this dtype. Interpreted bf16: Triton's interpreter casts
    fp32 -> bf16 by truncation (biased, up to 1 ulp instead of 1/2) at each of the reference's roundings;
    measured modulated output: mean 2.1x, worst 3.4x of torch's error over 30 seeds: 6x."""
    B, T, C = 2, 21, 257
    x, y = torch.randn(B, T, C, dtype=dtype), torch.randn(B, T, C, dtype=dtype)
    gate, shift, scale = params(B, T, C, "token", 3, dtype)
    h, out = gated_residual(x, gate, y, shift, scale)
    hr, outr = gated_residual_ref(x, gate, y, shift, scale)
    factor = 6 if (backend == "triton" and dtype == torch.bfloat16) else 2
    hx = x.double() + gate.double() * y.double()
    e, et = (h.double() - hx).abs().max().item(), (hr.double() - hx).abs().max().item()
    assert h.dtype == out.dtype == dtype and e <= factor * et + 1e-6, (e, et)
    def exact_mod(hh):                              # the modulated output, exact, of each one's own h
        return F.layer_norm(hh.double(), (C,), eps=1e-6) * (1 + scale.double()) + shift.double()
    e, et = (out.double() - exact_mod(h)).abs().max().item(), (outr.double() - exact_mod(hr)).abs().max().item()
    assert e <= factor * et + 1e-6, (e, et)


@pytest.mark.parametrize("op,kind", [("modulate", "token"), ("modulate_nonorm", "sample"), ("gated", "channel"),
                                     ("gated_fused", "token"), ("gated_fused", "sample")])
def test_grads_match_reference(backend, kind, op):
    B, T, C = 2, 11, 67
    base = [torch.randn(B, T, C), torch.randn(B, T, C)] + params(B, T, C, kind, 3)
    gouts = [torch.randn(B, T, C), torch.randn(B, T, C)]

    def run(mod, gr):
        x, y, gate, shift, scale = [t.detach().clone().requires_grad_() for t in base]
        if op.startswith("modulate"):
            outs = (mod(x, shift, scale, normalize=op == "modulate"),)
        elif op == "gated":
            outs = (gr(x, gate, y),)
        else:
            outs = gr(x, gate, y, shift, scale)
        sum((o * g).sum() for o, g in zip(outs, gouts)).backward()
        return [t.grad for t in (x, y, gate, shift, scale)]

    for g, gr_ in zip(run(adaln_modulate, gated_residual), run(adaln_modulate_ref, gated_residual_ref)):
        assert (g is None) == (gr_ is None)
        if g is not None:
            assert g.shape == gr_.shape and rel_err(g, gr_) < 1e-5


def test_grad_through_h_only(backend):
    """The fused call whose modulated output is unused: gradients flow through h alone."""
    x, y = torch.randn(1, 4, 32, requires_grad=True), torch.randn(1, 4, 32)
    gate, shift, scale = torch.randn(32), torch.randn(32), torch.randn(32, requires_grad=True)
    h, _ = gated_residual(x, gate, y, shift, scale)
    h.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert scale.grad is None or torch.equal(scale.grad, torch.zeros_like(scale))


def test_bad_input(backend):
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="must be \\(B, T, C\\)"):
        adaln_modulate(x[0], torch.zeros(8), torch.zeros(8))
    with pytest.raises(ValueError, match="does not broadcast"):
        adaln_modulate(x, torch.zeros(7), torch.zeros(8))
    with pytest.raises(ValueError, match="does not broadcast"):
        adaln_modulate(x, torch.zeros(2, 8), torch.zeros(8))          # (B, C) is not (B, 1, C)
    with pytest.raises(ValueError, match="y must match"):
        gated_residual(x, torch.zeros(8), torch.randn(2, 3, 9))
    with pytest.raises(ValueError, match="both shift and scale"):
        gated_residual(x, torch.zeros(8), x, torch.zeros(8))
    with pytest.raises(ValueError, match="like x"):
        adaln_modulate(x, torch.zeros(8, dtype=torch.float64), torch.zeros(8))


@needs_triton
def test_dispatch(monkeypatch):
    calls = []
    real = am.adaln_fwd_triton
    monkeypatch.setattr(am, "adaln_fwd_triton", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(1, 3, 8)
    monkeypatch.setenv("DAR_FAST_BACKEND", "torch")
    adaln_modulate(x, x, x)
    assert not calls
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("DAR_FAST_BACKEND_ADALN", "triton")
    adaln_modulate(x, x, x)
    gated_residual(x, x, x)
    assert calls == [1, 1]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_matches_ref(monkeypatch, dtype):
    monkeypatch.delenv("DAR_FAST_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    B, T, C = 8, 1024, 768
    x, y = torch.randn(B, T, C, device="cuda", dtype=dtype), torch.randn(B, T, C, device="cuda", dtype=dtype)
    gate, shift, scale = torch.randn(B, T, 3 * C, device="cuda", dtype=dtype).chunk(3, -1)
    (h, o), (hr, orf) = gated_residual(x, gate, y, shift, scale), gated_residual_ref(x, gate, y, shift, scale)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    assert rel_err(h, hr) < tol and rel_err(o, orf) < 4 * tol
