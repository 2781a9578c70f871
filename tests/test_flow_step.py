"""flow_step / flow_preview: Triton kernel (CPU: TRITON_INTERPRET=1) and the torch path against the references."""
import numpy as np
import pytest
import torch

from dar_fast import ops
from dar_fast.kernels import flow_step as fm
from dar_fast.kernels.flow_step import flow_preview, flow_preview_ref, flow_step, flow_step_ref, images_to_uint8_ref

from conftest import needs_triton


def inputs(B=3, C=3, H=20, W=20, dtype=torch.float32, device="cpu"):
    return [torch.randn(B, C, H, W, dtype=dtype, device=device) for _ in range(3)]


def times(kind, B, device="cpu"):
    """(t, t_next) as floats, 0-dim tensors, per-sample (B,) tensors, or mixed."""
    if kind == "float":
        return 0.1875, 0.4
    if kind == "0dim":
        return torch.tensor(0.1875, device=device), torch.tensor(0.4, device=device)
    if kind == "per_sample":
        t = torch.rand(B, device=device) * 0.5
        return t, t + 0.1 + torch.rand(B, device=device) * 0.3
    return torch.tensor(0.3, device=device), 0.55           # "mixed": tensor t, float t_next


def close32(a, b):
    """fp32 results equal up to FMA contraction: a few ulps of the operands."""
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ab", [False, True], ids=["euler", "adams_bashforth"])
@pytest.mark.parametrize("tkind", ["float", "0dim", "per_sample", "mixed"])
@pytest.mark.parametrize("shape", [(3, 3, 20, 20), (2, 3, 24, 40), (5, 7)], ids=["20x20", "24x40", "2d"])
def test_step_matches_ref(backend, ab, tkind, shape):
    x, v, vp = [torch.randn(shape) for _ in range(3)]
    vp = vp if ab else None
    t, tn = times(tkind, shape[0])
    out = ops.flow_step(x, v, vp, t, tn)
    assert out.dtype == x.dtype and out.shape == x.shape
    close32(out, flow_step_ref(x, v, vp, t, tn))


@pytest.mark.parametrize("tkind", ["float", "per_sample"])
def test_preview_matches_ref(backend, tkind):
    x, v, vp = inputs(B=2, H=12, W=8)
    t, _ = times(tkind, 2)
    close32(flow_preview(x, v, vp, t), flow_preview_ref(x, v, vp, t))
    close32(flow_preview(x, v, None, t), flow_step(x, v, None, t, 1.0))


def test_scalar_times_exact(backend):
    """Python-float times: dt = t_next - t is rounded once, as the reference does (fp32 results identical
    except for FMA contraction of x + dt*d, at most an ulp or so)."""
    x, v, vp = inputs(B=1, H=8, W=8)
    out, ref = flow_step(x, v, vp, 0.25, 0.5), flow_step_ref(x, v, vp, 0.25, 0.5)
    ulp = torch.finfo(torch.float32).eps * ref.abs().clamp_min(1.0)
    assert ((out - ref).abs() <= 2 * ulp).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(backend, dtype):
    """Error vs an fp64 reference at most 2x torch's own (Triton's interpreter truncates fp32 -> bf16: 4x)."""
    x, v, vp = inputs(B=2, H=20, W=20, dtype=dtype)
    t, tn = 0.3, 0.55
    out = flow_step(x, v, vp, t, tn)
    assert out.dtype == dtype
    exact = flow_step_ref(x.double(), v.double(), vp.double(), t, tn)
    err = (out.double() - exact).abs().max().item()
    err_t = (flow_step_ref(x, v, vp, t, tn).double() - exact).abs().max().item()
    factor = 4 if (backend == "triton" and dtype == torch.bfloat16) else 2
    assert err <= factor * err_t + 1e-6, (err, err_t)


@pytest.mark.parametrize("data_std", [0.5, "tensor"])
def test_image_output(backend, data_std):
    x, v, vp = inputs(B=3, H=20, W=20)
    ds = torch.tensor(0.5) if data_std == "tensor" else data_std
    t, tn = times("per_sample", 3)
    img = flow_step(x, v, vp, t, tn, data_std=ds)
    assert img.shape == x.shape and img.dtype == x.dtype
    close32(img, flow_step_ref(x, v, vp, t, tn) / ds)


def test_images_to_uint8_ref():
    img = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 1.2]).view(1, 1, 1, 8).expand(2, 3, 1, 8)
    u = images_to_uint8_ref(img)
    assert u.shape == (2, 1, 8, 3) and u.dtype == torch.uint8
    # 127.5 * img + 128 truncated: 0.0 -> 128, 0.5 -> 191 (191.75), 0.999 -> 255 (255.37), -0.999 -> 0 (0.63)
    assert u[0, 0, :, 0].tolist() == [0, 0, 0, 128, 191, 255, 255, 255]
    assert torch.equal(u[..., 0], u[..., 2])
    assert torch.equal(images_to_uint8_ref(img.to(torch.bfloat16)), images_to_uint8_ref(img.to(torch.bfloat16).float()))


@pytest.mark.parametrize("shape", [(3, 3, 20, 20), (2, 3, 24, 40)])
@pytest.mark.parametrize("ab", [False, True])
def test_uint8_output(backend, shape, ab):
    """uint8 NHWC exactly as the reference, except a value whose float image lies within the kernel-vs-
    reference disagreement of the flow update (FMA contraction of x + dt*d on GPU: ~1 ulp) of an integer
    boundary; the conversion itself is exact (test_uint8_conversion_bit_exact). Under the CPU interpreter
    (numpy: no FMA) the float images are bit-identical."""
    x, v, vp = [torch.randn(shape) * 0.6 for _ in range(3)]      # ~1% of the image beyond [-1, 1]: clamps too
    vp = vp if ab else None
    ds = 0.5
    t, tn = times("per_sample", shape[0])
    u = flow_step(x, v, vp, t, tn, data_std=ds, to_uint8=True)
    B, C, H, W = shape
    assert u.shape == (B, H, W, C) and u.dtype == torch.uint8 and u.is_contiguous()
    ref = images_to_uint8_ref(flow_step_ref(x, v, vp, t, tn) / ds)
    diff = (u.int() - ref.int()).abs()
    if diff.any():
        img_k = flow_step(x, v, vp, t, tn, data_std=ds)                # the kernel's own float image
        img_r = flow_step_ref(x, v, vp, t, tn) / ds
        delta = 127.5 * (img_k - img_r).abs().max().item() + 1e-4   # float disagreement on the 0..255 scale
        val = (127.5 * img_r + 128).permute(0, 2, 3, 1)
        near = (val - val.round()).abs() <= delta
        assert diff.max() == 1 and near[diff > 0].all()
        assert (diff > 0).sum() <= 3


def test_uint8_boundaries_exact(backend):
    """Values on and next to integer boundaries: x lands exactly on (k / 127.5 - 1) * data_std (v = 0)."""
    k = torch.arange(0, 256, dtype=torch.float32)
    img = torch.cat([k / 127.5 - 1, (k + 0.5) / 127.5 - 1, torch.tensor([-3.0, 3.0, 1.0, -1.0])])
    n = img.numel()
    x = (img * 0.5).view(1, 1, 1, n).repeat(2, 3, 1, 1)
    v = torch.zeros_like(x)
    u = flow_step(x, v, None, 0.0, 0.5, data_std=0.5, to_uint8=True)
    assert torch.equal(u, images_to_uint8_ref(x / 0.5))


def test_bad_input_gives_clear_error(backend):
    x, v, vp = inputs(B=2, H=4, W=4)
    with pytest.raises(ValueError, match="needs data_std"):
        flow_step(x, v, vp, 0.1, 0.2, to_uint8=True)
    with pytest.raises(ValueError, match="v must have"):
        flow_step(x, v[:1], vp, 0.1, 0.2)
    with pytest.raises(ValueError, match="v_prev must have"):
        flow_step(x, v, vp[..., :2], 0.1, 0.2)
    with pytest.raises(ValueError, match="t must be"):
        flow_step(x, v, vp, torch.zeros(3), 0.2)
    with pytest.raises(TypeError, match="t_next must be"):
        flow_step(x, v, vp, 0.1, "0.2")
    with pytest.raises(ValueError, match="to_uint8=True needs a"):
        flow_step(x[0], v[0], vp[0], 0.1, 0.2, data_std=0.5, to_uint8=True)


@needs_triton
def test_dispatch(monkeypatch):
    calls = []
    real = fm.flow_step_triton
    monkeypatch.setattr(fm, "flow_step_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, v, vp = inputs(B=1, H=2, W=2)
    monkeypatch.setenv("DAR_FAST_BACKEND", "torch")
    flow_preview(x, v, vp, 0.5)
    assert not calls
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("DAR_FAST_BACKEND_FLOW_STEP", "triton")
    flow_preview(x, v, vp, 0.5)
    assert calls == [1]


# ----------------------------------------------------------------------------- GPU

def _no_env(monkeypatch):
    for var in ("DAR_FAST_BACKEND", "DAR_FAST_BACKEND_FLOW_STEP", "TRITON_INTERPRET"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_full_size(monkeypatch, dtype):
    _no_env(monkeypatch)
    x, v, vp = inputs(B=64, H=256, W=256, dtype=dtype, device="cuda")
    t, tn = times("per_sample", 64, "cuda")
    calls = []
    real = fm.flow_step_triton
    monkeypatch.setattr(fm, "flow_step_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = flow_step(x, v, vp, t, tn)
    assert calls == [1]
    ref32 = flow_step_ref(x.float(), v.float(), vp.float(), t, tn)
    if dtype == torch.float32:
        close32(out, ref32)
    else:
        torch.testing.assert_close(out, ref32.to(dtype))            # one rounding of the fp32 result
    u = flow_step(x, v, vp, t, tn, data_std=0.5, to_uint8=True)
    ref_u = images_to_uint8_ref(ref32 / 0.5)
    assert (u.int() - ref_u.int()).abs().max() <= 1 and (u != ref_u).float().mean() < 1e-5


@pytest.mark.gpu
def test_gpu_cuda_graph_with_device_times(monkeypatch):
    """One captured graph serves every step: t, t_next live on the device and are only rewritten."""
    _no_env(monkeypatch)
    x, v, vp = inputs(B=4, H=64, W=64, device="cuda")
    t = torch.zeros(4, device="cuda")
    tn = torch.zeros((), device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):                                     # warm-up: compile outside the capture
        flow_step(x, v, vp, t, tn)
        flow_step(x, v, vp, t, tn, data_std=0.5, to_uint8=True)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = flow_step(x, v, vp, t, tn)
        u = flow_step(x, v, vp, t, tn, data_std=0.5, to_uint8=True)
    for a, b in ((0.0, 0.125), (0.4, 0.6), (0.875, 1.0)):
        t.copy_(torch.tensor([a, a + 0.01, a + 0.02, a], device="cuda"))
        tn.fill_(b)
        g.replay()
        ref = flow_step_ref(x, v, vp, t, tn)
        close32(out, ref)
        assert (u.int() - images_to_uint8_ref(ref / 0.5).int()).abs().max() <= 1


def _released_uint8(img: torch.Tensor) -> np.ndarray:
    """The released scripts' conversion, written independently in numpy float32: clamp(127.5 x + 128, 0, 255)
    (multiply and add rounded separately), truncated to uint8, NHWC."""
    a = img.float().numpy()
    w = np.float32(127.5) * a
    w = (w + np.float32(128.0)).astype(np.float32)
    return np.clip(w, np.float32(0), np.float32(255)).astype(np.uint8).transpose(0, 2, 3, 1)


def test_uint8_conversion_bit_exact(backend):
    """ops.images_to_uint8 and the fused preview output equal the released formula bit for bit, on fresh
    random odd-sized images with ~20% of values outside [-1, 1]."""
    from dar_fast import ops
    img = torch.randn(3, 3, 17, 23) * 0.8
    img[0, 0, 0, :4] = torch.tensor([-1.0, 1.0, 0.0, 2.5])
    want = _released_uint8(img)
    assert np.array_equal(ops.images_to_uint8(img).numpy(), want)
    # fused: x = img * data_std, v = 0, so the kernel's image is img exactly (data_std 0.5: 1/0.5 = 2 exact)
    u = flow_step(img * 0.5, torch.zeros_like(img), None, 0.0, 0.25, data_std=0.5, to_uint8=True)
    assert np.array_equal(u.numpy(), want)
    # and it is not ADM's (x + 1) * 127.5 truncation, which is one lower on about half of the values
    adm = ((img + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert 0.3 < (adm != want).mean() < 0.7


def test_image_scale_is_reciprocal_multiply():
    """The image is x * (1 / data_std) as the released decoder computes it (a rounded reciprocal)."""
    x = torch.randn(2, 3, 9, 11)
    img = flow_step(x, torch.zeros_like(x), None, 0.0, 0.5, data_std=0.6)
    assert torch.equal(img, x * (1.0 / 0.6))
