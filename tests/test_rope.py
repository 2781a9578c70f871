"""apply_rope: Triton kernel (CPU: TRITON_INTERPRET=1) and the torch path against apply_rope_ref."""
import pytest
import torch

from dar_fast import ops
from dar_fast.kernels import rope as rm
from dar_fast.kernels.rope import apply_rope, apply_rope_ref, grid_positions, rope_angles

from conftest import needs_triton, rel_err


def positions(T, P, identity=0):
    """(T, P) table: a 2D grid (P=2) or 0..T-1 (P=1), the last `identity` rows -1."""
    if P == 2:
        w = 6
        pos = grid_positions((T - identity + w - 1) // w, w, device="cpu")[: T - identity]
    else:
        pos = torch.arange(T - identity, dtype=torch.int64)[:, None]
    return torch.cat([pos, torch.full((identity, P), -1, dtype=pos.dtype)])


def rope64(x, pos, base=10000.0):
    """fp64 rotation by the reference's (fp32) angles: the exact answer to measure rounding against."""
    ang = rope_angles(pos if pos.dim() == 2 else pos[:, None], x.shape[-1], base).double()
    c, s = torch.cos(ang)[None, :, None, :], torch.sin(ang)[None, :, None, :]
    xf = x.double().reshape(*x.shape[:-1], -1, 2)
    return torch.stack([c * xf[..., 0] - s * xf[..., 1], s * xf[..., 0] + c * xf[..., 1]], -1).reshape(x.shape)


CASES = [  # B, T, Hq, Hk, D, P, identity rows
    (3, 37, 5, 5, 64, 2, 7),
    (2, 13, 5, 5, 64, 1, 0),
    (2, 11, 4, 4, 32, 1, 3),
    (2, 9, 6, 2, 32, 2, 4),       # GQA: Hq != Hk
    (1, 7, 3, 3, 48, 2, 2),       # D/2 not a power of two (masked lanes)
]


@pytest.mark.parametrize("B,T,Hq,Hk,D,P,ident", CASES)
def test_matches_ref_fused_qkv_views(backend, B, T, Hq, Hk, D, P, ident):
    """q and k as strided views into a fused (B, T, (Hq+2Hk)*D) projection output, as the AR model has them."""
    qkv = torch.randn(B, T, (Hq + 2 * Hk) * D)
    q = qkv[..., :Hq * D].view(B, T, Hq, D)
    k = qkv[..., Hq * D:(Hq + Hk) * D].view(B, T, Hk, D)
    pos = positions(T, P, ident)
    before = qkv.clone()
    qo, ko = ops.apply_rope(q, k, pos)
    qr, kr = apply_rope_ref(q, k, pos)
    assert qo.dtype == q.dtype and qo.shape == q.shape and ko.shape == k.shape
    assert rel_err(qo, qr) < 1e-6 and rel_err(ko, kr) < 1e-6
    assert torch.equal(qkv, before)                                   # not in place
    if ident:                                                         # identity rows: untouched, bit for bit
        assert torch.equal(qo[:, -ident:], q[:, -ident:]) and torch.equal(ko[:, -ident:], k[:, -ident:])


def test_qkv_stacked_layout_and_1d_pos(backend):
    """(B, T, 3, H, D) fused layout, pos given as (T,) (P = 1)."""
    B, T, H, D = 2, 23, 3, 64
    qkv = torch.randn(B, T, 3, H, D)
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    pos = torch.arange(T, dtype=torch.int32) + 5
    qo, ko = apply_rope(q, k, pos)
    qr, kr = apply_rope_ref(q, k, pos)
    assert rel_err(qo, qr) < 1e-6 and rel_err(ko, kr) < 1e-6


def test_k_none_cross_attention(backend):
    q = torch.randn(2, 4, 13, 64).transpose(1, 2)         # (B,T,H,D) view of a (B,H,T,D) tensor
    pos = positions(13, 2, 0)
    qo, ko = apply_rope(q, None, pos)
    assert ko is None
    assert rel_err(qo, apply_rope_ref(q, None, pos)[0]) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_2x_torch_error(backend, dtype):
    """Error vs fp64 at most 2x torch's own in this dtype. Triton's interpreter casts fp32 -> bf16 by
    truncation, not round-to-nearest (up to 1 ulp instead of 1/2), so on CPU bf16 gets 4x."""
    B, T, H, D = 2, 13, 3, 64
    q, k = torch.randn(B, T, H, D, dtype=dtype), torch.randn(B, T, H, D, dtype=dtype)
    pos = positions(T, 2, 3)
    qo, ko = apply_rope(q, k, pos)
    assert qo.dtype == dtype and ko.dtype == dtype
    qt, kt = apply_rope_ref(q, k, pos)                   # torch's own answer in this dtype
    for out, ref_t, x in ((qo, qt, q), (ko, kt, k)):
        exact = rope64(x, pos)
        err, err_t = (out.double() - exact).abs().max().item(), (ref_t.double() - exact).abs().max().item()
        factor = 4 if (backend == "triton" and dtype == torch.bfloat16) else 2
        assert err <= factor * err_t + 1e-6, (err, err_t)


def test_gradcheck_reference():
    """The reference's gradient (float64 inputs; its math is fp32, and linear, so a large eps is exact)."""
    q = torch.randn(1, 3, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 3, 1, 8, dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([[0, 1], [2, 3], [-1, -1]])
    assert torch.autograd.gradcheck(lambda a, b: apply_rope_ref(a, b, pos), (q, k), eps=1e-2, atol=1e-5, rtol=1e-4)


@needs_triton
def test_gradcheck_kernel(monkeypatch):
    """The autograd Function's backward (rotation by -angle) against finite differences; tiny: interpreted."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("DAR_FAST_BACKEND", "triton")
    q = torch.randn(1, 2, 2, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 1, 4, dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([[1, 2], [3, -1]])
    assert torch.autograd.gradcheck(lambda a, b: apply_rope(a, b, pos), (q, k), eps=1e-2, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("with_k", [True, False])
def test_grads_match_reference(backend, with_k):
    B, T, Hq, Hk, D = 2, 17, 4, 2, 64
    pos = positions(T, 2, 3)
    base = torch.randn(B, T, Hq + 2 * Hk, D)
    gq, gk = torch.randn(B, T, Hq, D), torch.randn(B, T, Hk, D)

    def grads(fn):
        x = base.clone().requires_grad_()
        q, k = x[:, :, :Hq], (x[:, :, Hq:Hq + Hk] if with_k else None)     # views: grads flow to x
        qo, ko = fn(q, k, pos)
        loss = (qo * gq).sum() + ((ko * gk).sum() if with_k else 0)
        loss.backward()
        return x.grad

    g, g_ref = grads(apply_rope), grads(apply_rope_ref)
    assert rel_err(g, g_ref) < 1e-6
    assert torch.equal(g[:, :, Hq + Hk:], torch.zeros_like(g[:, :, Hq + Hk:]))   # the v part gets nothing


def test_inplace_inference(backend):
    B, T, H, D = 2, 21, 3, 64
    qkv = torch.randn(B, T, 3, H, D)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    v_before = v.clone()
    pos = positions(T, 2, 5)
    qr, kr = apply_rope_ref(q, k, pos)
    with torch.inference_mode():
        qo, ko = apply_rope(q, k, pos, inplace=True)
    assert qo is q and ko is k
    assert rel_err(qkv[:, :, 0], qr) < 1e-6 and rel_err(qkv[:, :, 1], kr) < 1e-6
    assert torch.equal(v, v_before)


def test_inplace_ignored_when_grad_needed(backend):
    q = torch.randn(1, 9, 2, 32, requires_grad=True)
    k = torch.randn(1, 9, 2, 32)
    q0, k0 = q.detach().clone(), k.clone()
    pos = positions(9, 1, 0)
    qo, ko = apply_rope(q, k, pos, inplace=True)
    assert qo is not q and torch.equal(q.detach(), q0) and torch.equal(k, k0)
    assert rel_err(qo, apply_rope_ref(q0, k0, pos)[0]) < 1e-6


def test_bad_input_gives_clear_error(backend):
    q = torch.randn(2, 5, 3, 64)
    with pytest.raises(ValueError, match="q must be"):
        apply_rope(q[0], None, torch.arange(5))
    with pytest.raises(ValueError, match="k must be"):
        apply_rope(q, torch.randn(2, 4, 3, 64), torch.arange(5))
    with pytest.raises(ValueError, match="pos must be"):
        apply_rope(q, None, torch.arange(6))
    with pytest.raises(ValueError, match="does not split"):
        apply_rope(q, None, torch.zeros(5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="does not split"):
        apply_rope(torch.randn(2, 5, 3, 6), None, torch.zeros(5, 2, dtype=torch.long))


@needs_triton
def test_dispatch(monkeypatch):
    calls = []
    real = rm.rope_triton
    monkeypatch.setattr(rm, "rope_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    q, pos = torch.randn(1, 3, 2, 8), torch.arange(3)
    monkeypatch.setenv("DAR_FAST_BACKEND", "torch")
    apply_rope(q, q, pos)
    assert not calls
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("DAR_FAST_BACKEND", "triton")
    apply_rope(q, q, pos)
    assert calls == [1]


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("B,T,Hq,Hk,P,dtype", [(4, 1280, 12, 12, 2, torch.bfloat16),   # tokenizer 2D
                                               (128, 1, 16, 16, 1, torch.bfloat16),    # AR decode
                                               (3, 37, 5, 5, 2, torch.float32)])
def test_gpu_matches_ref(monkeypatch, B, T, Hq, Hk, P, dtype):
    monkeypatch.delenv("DAR_FAST_BACKEND", raising=False)
    monkeypatch.delenv("DAR_FAST_BACKEND_ROPE", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    D = 64
    qkv = torch.randn(B, T, (Hq + 2 * Hk) * D, device="cuda", dtype=dtype)
    q = qkv[..., :Hq * D].view(B, T, Hq, D)
    k = qkv[..., Hq * D:(Hq + Hk) * D].view(B, T, Hk, D)
    pos = positions(T, P, 256 if T > 256 else 0).cuda() if T > 1 else torch.tensor([[77]], device="cuda")
    calls = []
    real = rm.rope_triton
    monkeypatch.setattr(rm, "rope_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    qo, ko = apply_rope(q, k, pos)
    assert calls == [1]
    qr, kr = apply_rope_ref(q, k, pos)
    if dtype == torch.float32:
        assert rel_err(qo, qr) < 1e-6 and rel_err(ko, kr) < 1e-6
    else:
        for out, ref_t, x in ((qo, qr, q), (ko, kr, k)):
            exact = rope64(x.cpu(), pos.cpu())
            err = (out.cpu().double() - exact).abs().max().item()
            err_t = (ref_t.cpu().double() - exact).abs().max().item()
            assert err <= 2 * err_t + 1e-6, (err, err_t)


@pytest.mark.gpu
def test_gpu_grads_match_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    B, T, H, D = 2, 300, 4, 64
    pos = positions(T, 2, 44).cuda()
    x = torch.randn(B, T, 2 * H, D, device="cuda")
    g = torch.randn(B, T, 2 * H, D, device="cuda")
    out = []
    for fn in (apply_rope, apply_rope_ref):
        xx = x.clone().requires_grad_()
        qo, ko = fn(xx[:, :, :H], xx[:, :, H:], pos)
        (torch.cat([qo, ko], 2) * g).sum().backward()
        out.append(xx.grad)
    assert rel_err(out[0], out[1]) < 1e-6


@pytest.mark.gpu
def test_gpu_cuda_graph_with_device_positions(monkeypatch):
    """One captured graph serves every position: pos lives on the device and is only rewritten."""
    monkeypatch.delenv("DAR_FAST_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    B, H, D = 8, 16, 64
    q = torch.randn(B, 1, H, D, device="cuda")
    k = torch.randn(B, 1, H, D, device="cuda")
    pos = torch.zeros(1, 1, dtype=torch.int32, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        apply_rope(q, k, pos)                                  # warm-up: compile outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        qo, ko = apply_rope(q, k, pos)
    for p in (3, 100, 255):
        pos.fill_(p)
        g.replay()
        qr, kr = apply_rope_ref(q, k, pos)
        assert rel_err(qo, qr) < 1e-6 and rel_err(ko, kr) < 1e-6
