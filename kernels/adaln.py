"""DiT adaLN: LayerNorm (no affine) + modulate in one pass, and the gated residual fused with the next one.

    adaln_modulate(x, shift, scale, eps=1e-6, normalize=True)
        -> LN(x) * (1 + scale) + shift          (normalize=False: x * (1 + scale) + shift)
    gated_residual(x, gate, y, shift=None, scale=None, eps=1e-6)
        -> h = x + gate * y                     (shift / scale None)
        -> (h, LN(h) * (1 + scale) + shift)     (the next sub-block's modulated input, same pass)

x, y: (B, T, C) (activations contiguous in (B, T, C); other layouts are
copied). shift, scale, gate: anything that broadcasts to (B, T, C) with a
contiguous last dim: per token (B, T, C) (the D-AR DiT's modulation is per
token: views from `mod.chunk(6, -1)` with row stride 6C need no copy), per
sample (B, 1, C), or per channel (C,) (the GatedBlock's gates). LN is
F.layer_norm without affine (biased variance, eps 1e-6 as in the released
tokenizer). Roundings follow the unfused reference in x's dtype: LN(h),
1 + scale, the product, the sum, gate * y and x + gate * y are each rounded
to x's dtype (math in float32). Forward and backward are kernels (the
tokenizer trains through them); gradients of broadcast parameters are
reduced by torch (`sum_to_size`).

The D-AR DiT block, unfused (`DiTBlock.forward`), then with these ops:
    h = LN(x); ...; x = x + ga * attn(h * (1 + ca) + sa); out = x + gm * mlp(LN(x) * (1 + cm) + sm)
    h = LN(x); ...; x, u = gated_residual(x, ga, attn(adaln_modulate(h, sa, ca, normalize=False)), sm, cm)
    out = gated_residual(x, gm, mlp(u))

Where the kernel is fast, and why it stops being fast
-----------------------------------------------------
Bandwidth-bound, one program per token row. adaln_modulate reads x, shift,
scale and writes one output: 4 element-moves; the reference (layer_norm,
1 + scale, product, sum) makes ~9 plus 4 launches (estimate: counted from
the ops). gated_residual with the next modulation reads x, gate, y, shift,
scale and writes h and the modulated row: 7 element-moves instead of ~14 over
6 launches. D-AR-XL tokenizer DiT (B = 64, T = 1024, C = 1024 (estimate of
its width from the config), bf16): one fused call moves 64 x 1024 x 1024 x 7
x 2 B = 0.94 GB, ~0.28 ms at 3.35 TB/s, against ~0.56 ms for the unfused
sequence (estimate: same arithmetic with 14 moves).
It stops being fast when
  * C is very large (> 16K: the row no longer fits one program);
  * parameters are broadcast: then they are read from L2 (cheap) but their
    gradients need a (B, T, C) temporary reduced by torch.
Precision: float32 statistics with IEEE division and sqrt; on the GPU the
kernel equals the reference up to one rounding in x's dtype.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from dar_fast.kernels._interp import interpreted_stdlib, interpreting, on_device
from dar_fast.ops import use_kernel

try:  # optional: the module must import (and the reference run) without triton
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

__all__ = ["adaln_modulate", "adaln_modulate_ref", "gated_residual", "gated_residual_ref"]

LN_EPS = 1e-6


# ----------------------------------------------------------------------------- references

def adaln_modulate_ref(x, shift, scale, eps: float = LN_EPS, normalize: bool = True):
    """Plain PyTorch: LN(x) * (1 + scale) + shift (LN skipped when normalize=False)."""
    h = F.layer_norm(x, x.shape[-1:], eps=eps) if normalize else x
    return h * (1 + scale) + shift


def gated_residual_ref(x, gate, y, shift=None, scale=None, eps: float = LN_EPS):
    """Plain PyTorch: h = x + gate * y, and (h, adaln_modulate_ref(h, shift, scale)) when shift/scale given."""
    h = x + gate * y
    if shift is None:
        return h
    return h, adaln_modulate_ref(h, shift, scale, eps)


# ----------------------------------------------------------------------------- kernels

def _adaln_fwd_kernel(x_ptr, g_ptr, y_ptr, sh_ptr, sc_ptr, h_ptr, o_ptr, mean_ptr, rstd_ptr,
                      T, C, sgb, sgt, sshb, ssht, sscb, ssct, eps,
                      GATED: tl.constexpr, NORM: tl.constexpr, MOD: tl.constexpr, BLOCK_C: tl.constexpr):
    """Token row pid = b * T + t: h = x (+ round(gate * y)); o = round(round(round(LN(h)) * round(1 + scale)) + shift)."""
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    row = pid.to(tl.int64) * C
    c = tl.arange(0, BLOCK_C)
    m = c < C
    dt = x_ptr.dtype.element_ty
    h = tl.load(x_ptr + row + c, mask=m, other=0.0).to(tl.float32)
    if GATED:
        g = tl.load(g_ptr + b * sgb + t * sgt + c, mask=m, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + row + c, mask=m, other=0.0).to(tl.float32)
        h = (h + (g * y).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        tl.store(h_ptr + row + c, h.to(dt), mask=m)
    if MOD:
        if NORM:
            mean = tl.div_rn(tl.sum(h, axis=0), C * 1.0)          # IEEE division (plain / is approximate)
            d = tl.where(m, h - mean, 0.0)
            var = tl.div_rn(tl.sum(d * d, axis=0), C * 1.0)
            rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
            n = (d * rstd).to(dt).to(tl.float32)
            tl.store(mean_ptr + pid, mean)
            tl.store(rstd_ptr + pid, rstd)
        else:
            n = h
        sc = tl.load(sc_ptr + b * sscb + t * ssct + c, mask=m, other=0.0).to(tl.float32)
        sh = tl.load(sh_ptr + b * sshb + t * ssht + c, mask=m, other=0.0).to(tl.float32)
        o = (n * (1.0 + sc).to(dt).to(tl.float32)).to(dt).to(tl.float32) + sh
        tl.store(o_ptr + row + c, o.to(dt), mask=m)


def _adaln_bwd_kernel(h_ptr, g_ptr, y_ptr, sc_ptr, mean_ptr, rstd_ptr, go_ptr, gh_ptr,
                      dh_ptr, dsc_ptr, dy_ptr, dg_ptr,
                      T, C, sgb, sgt, sscb, ssct,
                      GATED: tl.constexpr, NORM: tl.constexpr, MOD: tl.constexpr, HAS_GH: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    """Token row pid: dh (= dx), full-size d scale = go * n, and (GATED) dy = dh * gate, d gate = dh * y."""
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    row = pid.to(tl.int64) * C
    c = tl.arange(0, BLOCK_C)
    m = c < C
    dh = tl.zeros([BLOCK_C], dtype=tl.float32)
    if MOD:
        h = tl.load(h_ptr + row + c, mask=m, other=0.0).to(tl.float32)
        go = tl.load(go_ptr + row + c, mask=m, other=0.0).to(tl.float32)
        sc = tl.load(sc_ptr + b * sscb + t * ssct + c, mask=m, other=0.0).to(tl.float32)
        if NORM:
            mean = tl.load(mean_ptr + pid)
            rstd = tl.load(rstd_ptr + pid)
            n = tl.where(m, (h - mean) * rstd, 0.0)
        else:
            n = h
        tl.store(dsc_ptr + row + c, (go * n.to(h_ptr.dtype.element_ty).to(tl.float32)).to(dsc_ptr.dtype.element_ty),
                 mask=m)
        dn = go * (1.0 + sc)
        if NORM:
            mdn = tl.div_rn(tl.sum(dn, axis=0), C * 1.0)
            mdnn = tl.div_rn(tl.sum(dn * n, axis=0), C * 1.0)
            dh = rstd * (dn - mdn - n * mdnn)
        else:
            dh = dn
    if HAS_GH:
        dh += tl.load(gh_ptr + row + c, mask=m, other=0.0).to(tl.float32)
    tl.store(dh_ptr + row + c, dh.to(dh_ptr.dtype.element_ty), mask=m)
    if GATED:
        g = tl.load(g_ptr + b * sgb + t * sgt + c, mask=m, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + row + c, mask=m, other=0.0).to(tl.float32)
        tl.store(dy_ptr + row + c, (dh * g).to(dy_ptr.dtype.element_ty), mask=m)
        tl.store(dg_ptr + row + c, (dh * y).to(dg_ptr.dtype.element_ty), mask=m)


@functools.lru_cache(maxsize=None)
def _kernels(interpret: bool):
    """The jitted kernels; built per TRITON_INTERPRET mode (triton.jit reads it at decoration)."""
    return triton.jit(_adaln_fwd_kernel), triton.jit(_adaln_bwd_kernel)


def _param(p, x, name):
    """(B, T, C) broadcast view of a parameter with a contiguous last dim, and its (b, t) strides."""
    if p is None:
        return x, 0, 0
    try:
        e = p.expand(x.shape)
    except RuntimeError:
        raise ValueError(f"adaln: {name} of shape {tuple(p.shape)} does not broadcast to x {tuple(x.shape)}") from None
    if e.stride(-1) != 1 and x.shape[-1] > 1:
        e = e.contiguous()
    return e, e.stride(0), e.stride(1)


def _warps(block_c: int) -> int:
    return 1 if block_c <= 256 else 4 if block_c <= 2048 else 8


# ----------------------------------------------------------------------------- host launchers

def adaln_fwd_triton(x, gate, y, shift, scale, eps, normalize):
    """Launch the forward: (h or None, out or None, mean, rstd). x, y contiguous (B, T, C)."""
    B, T, C = x.shape
    gated, mod = gate is not None, shift is not None
    g, sgb, sgt = _param(gate, x, "gate")
    sh, sshb, ssht = _param(shift, x, "shift")
    sc, sscb, ssct = _param(scale, x, "scale")
    h = torch.empty_like(x) if gated else None
    o = torch.empty_like(x) if mod else None
    mean = torch.empty(B * T, dtype=torch.float32, device=x.device)
    rstd = torch.empty(B * T, dtype=torch.float32, device=x.device)
    if B * T and C:
        bc = triton.next_power_of_2(C)
        with interpreted_stdlib(), on_device(x):
            _kernels(interpreting())[0][(B * T,)](
                x, g, x if y is None else y, sh, sc, x if h is None else h, x if o is None else o, mean, rstd,
                T, C, sgb, sgt, sshb, ssht, sscb, ssct, float(eps),
                GATED=gated, NORM=normalize, MOD=mod, BLOCK_C=bc, num_warps=_warps(bc))
    return h, o, mean, rstd


def adaln_bwd_triton(hin, gate, y, scale, mean, rstd, go, gh, normalize):
    """Launch the backward: (dh, full-size dscale or None, dy or None, full-size dgate or None)."""
    B, T, C = hin.shape
    gated, mod = gate is not None, go is not None
    g, sgb, sgt = _param(gate, hin, "gate")
    sc, sscb, ssct = _param(scale, hin, "scale")
    dh = torch.empty_like(hin)
    dsc = torch.empty_like(hin) if mod else None
    dy = torch.empty_like(hin) if gated else None
    dg = torch.empty_like(hin) if gated else None
    go = None if go is None else go.contiguous()
    gh = None if gh is None else gh.contiguous()
    if B * T and C:
        bc = triton.next_power_of_2(C)
        with interpreted_stdlib(), on_device(hin):
            _kernels(interpreting())[1][(B * T,)](
                hin, g, hin if y is None else y, sc, mean, rstd, hin if go is None else go, hin if gh is None else gh,
                dh, dh if dsc is None else dsc, dh if dy is None else dy, dh if dg is None else dg,
                T, C, sgb, sgt, sscb, ssct,
                GATED=gated, NORM=normalize, MOD=mod, HAS_GH=gh is not None, BLOCK_C=bc, num_warps=_warps(bc))
    return dh, dsc, dy, dg


class AdaLNFunction(torch.autograd.Function):
    """Autograd for both ops: outputs (h,) / (out,) / (h, out) depending on gate / shift being given."""

    @staticmethod
    def forward(ctx, x, gate, y, shift, scale, eps, normalize):
        h, o, mean, rstd = adaln_fwd_triton(x, gate, y, shift, scale, eps, normalize)
        hin = x if h is None else h
        ctx.save_for_backward(hin, gate, y, scale, mean, rstd)
        ctx.shapes = tuple(None if p is None else p.shape for p in (gate, shift, scale))
        ctx.normalize = normalize
        ctx.set_materialize_grads(False)
        return tuple(t for t in (h, o) if t is not None)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        hin, gate, y, scale, mean, rstd = ctx.saved_tensors
        gshape, shshape, scshape = ctx.shapes
        gated, mod = gshape is not None, shshape is not None
        gh = grads[0] if gated else None
        go = grads[-1] if mod else None
        if go is None and mod:          # only h was used: d out = 0
            go = torch.zeros_like(hin)
        if gh is None and go is None:
            return (None,) * 7
        dh, dsc, dy, dg = adaln_bwd_triton(hin, gate, y, scale, mean, rstd, go, gh, ctx.normalize)
        dshift = go.sum_to_size(shshape) if mod else None
        dscale = dsc.sum_to_size(scshape) if mod else None
        dgate = dg.sum_to_size(gshape) if gated else None
        return dh, dgate, dy, dshift, dscale, None, None


# ----------------------------------------------------------------------------- public

def _check(x, *named):
    if x.dim() != 3:
        raise ValueError(f"adaln: x must be (B, T, C), got shape {tuple(x.shape)}")
    for name, p in named:
        if p is None:
            continue
        if p.dtype != x.dtype or p.device != x.device:
            raise ValueError(f"adaln: {name} must be {x.dtype} on {x.device} like x, got {p.dtype} on {p.device}")
        try:
            ok = torch.broadcast_shapes(p.shape, x.shape) == x.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"adaln: {name} of shape {tuple(p.shape)} does not broadcast to x {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"adaln: x must be floating point, got {x.dtype}")


def _run(x, gate, y, shift, scale, eps, normalize):
    x = x.contiguous()
    y = None if y is None else y.contiguous()
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, gate, y, shift, scale))
    if needs_grad:
        return AdaLNFunction.apply(x, gate, y, shift, scale, eps, normalize)
    h, o, _, _ = adaln_fwd_triton(x, gate, y, shift, scale, eps, normalize)
    return tuple(t for t in (h, o) if t is not None)


def adaln_modulate(x, shift, scale, eps: float = LN_EPS, normalize: bool = True):
    """`dar_fast.ops.adaln_modulate`: LN(x) * (1 + scale) + shift. See the module docstring."""
    _check(x, ("shift", shift), ("scale", scale))
    if shift is None or scale is None:
        raise ValueError("adaln_modulate: shift and scale are required")
    if not use_kernel("adaln", x, shift, scale):
        return adaln_modulate_ref(x, shift, scale, eps, normalize)
    return _run(x, None, None, shift, scale, eps, normalize)[0]


def gated_residual(x, gate, y, shift=None, scale=None, eps: float = LN_EPS):
    """`dar_fast.ops.gated_residual`: x + gate * y, and with shift/scale also the next modulated input."""
    _check(x, ("gate", gate), ("shift", shift), ("scale", scale))
    if y is None or gate is None or y.shape != x.shape or y.dtype != x.dtype:
        raise ValueError(f"gated_residual: y must match x {tuple(x.shape)} {x.dtype}, got "
                         f"{None if y is None else (tuple(y.shape), y.dtype)}")
    if (shift is None) != (scale is None):
        raise ValueError("gated_residual: give both shift and scale, or neither")
    if not use_kernel("adaln", x, gate, y, shift, scale):
        return gated_residual_ref(x, gate, y, shift, scale, eps)
    out = _run(x, gate, y, shift, scale, eps, True)
    return out[0] if shift is None else out
