"""RMSNorm with an optional fused residual add (the Llama blocks of the AR model).

    rms_norm(x, weight, eps=1e-5)                 -> y
    rms_norm(x, weight, eps=1e-5, residual=r)     -> (y, h)   with h = x + r

x, r: (..., C) float tensors of one dtype (last dim contiguous; other dims are
flattened to M rows, copied only when they cannot be viewed as (M, C)).
weight: (C,). y = (h * rsqrt(mean(h^2) + eps)).to(x.dtype) * weight, the
released `RMSNorm.forward` (statistics in float32, the normalised row rounded
to x's dtype, then multiplied by the weight; y's dtype is the promotion of
x's and weight's). h = x + r is rounded to x's dtype before it is normalised,
as the unfused block does (`h = x + attn(...)`; `ffn_norm(h)`), and returned:
it is the next residual stream. Backward (dx, dr, dweight) is a kernel too:
the model trains through it.

Where the kernel is fast, and why it stops being fast
-----------------------------------------------------
Bandwidth-bound (~4 FLOP per element). One program per row reads the row
(and the residual row) once, reduces in float32 in registers and writes y
(and h) once: bf16, C = 1024, fused residual: 2 reads + 2 writes = 8 bytes
per element. The reference makes about 8 passes (float copy, square, mean,
add + rsqrt, multiply, cast, weight multiply; plus the residual add before it):
roughly 30-40 bytes per element in bf16, and 7-8 launches instead of 1
(estimate: counted from the ops in `rms_norm_ref`). At AR decode (M = 2 x 64
CFG rows, C = 1024, bf16) a call moves 0.5 MB: ~0.2 us of HBM time at 3 TB/s
(estimate: 128 x 1024 x 4 x 2 B / 3.35e12 B/s), so it is launch-bound (~3 us)
unless captured in a CUDA graph, where 7 launches -> 1 is the gain.
Backward: one program per block of rows reads x (or h), gy, weight and the
saved 1/rms and writes dx plus one float32 partial dweight row per program;
the partial rows (at most 512) are summed by torch.
It stops being fast when
  * C is very large (> 16K): a whole row no longer fits one program's
    registers comfortably (spills);
  * rows are not contiguous: they are copied first.
Precision: float32 statistics; 1/rms is computed as IEEE 1/sqrt (the
reference's torch.rsqrt is approximate on CUDA), so y can differ from the
reference by one rounding of x's dtype.
"""
from __future__ import annotations

import functools

import torch

from dar_fast.kernels._interp import interpreted_stdlib, interpreting, on_device
from dar_fast.ops import use_kernel

try:  # optional: the module must import (and the reference run) without triton
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

__all__ = ["rms_norm", "rms_norm_ref"]


# ----------------------------------------------------------------------------- reference

def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, residual: torch.Tensor | None = None):
    """Plain PyTorch: y, or (y, h = x + residual) when residual is given."""
    h = x if residual is None else x + residual
    hf = h.float()
    y = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).type_as(h) * weight
    return y if residual is None else (y, h)


# ----------------------------------------------------------------------------- kernels

def _rms_fwd_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, rstd_ptr, C, sx, sr, sy, sh, eps,
                    HAS_RES: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row program_id(0): h = x (+ r), 1/rms, y = round(h / rms) * w; stores h (HAS_RES) and 1/rms."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    m = c < C
    x = tl.load(x_ptr + row * sx + c, mask=m, other=0.0)
    if HAS_RES:
        r = tl.load(r_ptr + row * sr + c, mask=m, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)   # rounded like the unfused add
        tl.store(h_ptr + row * sh + c, x, mask=m)
    xf = x.to(tl.float32)
    ms = tl.div_rn(tl.sum(xf * xf, axis=0), C * 1.0)     # IEEE division (plain / is approximate)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(ms + eps))            # IEEE (plain rsqrt / division are approximate)
    n = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + c, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * sy + c, (n * w).to(y_ptr.dtype.element_ty), mask=m)
    tl.store(rstd_ptr + row, rstd)


def _rms_bwd_kernel(h_ptr, gy_ptr, gh_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, M, C, rows_per_prog,
                    HAS_GH: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows [pid * rows_per_prog, ...): dx = rstd * (g w - n mean(g w n)) (+ gh); partial dw row pid."""
    pid = tl.program_id(0)
    c = tl.arange(0, BLOCK_C)
    m = c < C
    w = tl.load(w_ptr + c, mask=m, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(0, rows_per_prog):
        row = pid * rows_per_prog + i
        if row < M:
            off = row.to(tl.int64) * C + c
            hf = tl.load(h_ptr + off, mask=m, other=0.0).to(tl.float32)
            g = tl.load(gy_ptr + off, mask=m, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            n = hf * rstd
            dw += g * n.to(h_ptr.dtype.element_ty).to(tl.float32)
            gn = g * w
            dx = rstd * (gn - n * tl.div_rn(tl.sum(gn * n, axis=0), C * 1.0))
            if HAS_GH:
                dx += tl.load(gh_ptr + off, mask=m, other=0.0).to(tl.float32)
            tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=m)
    tl.store(dw_ptr + pid.to(tl.int64) * C + c, dw, mask=m)


@functools.lru_cache(maxsize=None)
def _kernels(interpret: bool):
    """The jitted kernels; built per TRITON_INTERPRET mode (triton.jit reads it at decoration)."""
    return triton.jit(_rms_fwd_kernel), triton.jit(_rms_bwd_kernel)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(M, C) view of a (..., C) tensor, copied only when no such view exists."""
    C = t.shape[-1]
    if t.stride(-1) != 1:
        t = t.contiguous()
    try:
        return t.view(-1, C)
    except RuntimeError:
        return t.reshape(-1, C).contiguous()


def _warps(block_c: int) -> int:
    return 1 if block_c <= 256 else 4 if block_c <= 2048 else 8


# ----------------------------------------------------------------------------- host launchers

def rms_norm_fwd_triton(x, weight, eps, residual=None):
    """Launch the forward: (y, h or None, rstd (M,) float32), y/h shaped like x."""
    C = x.shape[-1]
    x2 = _rows(x)
    r2 = None if residual is None else _rows(residual)
    M = x2.shape[0]
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    h = None if residual is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0:
        return y, h, rstd
    y2 = y.view(-1, C)
    h2 = y2 if h is None else h.view(-1, C)
    bc = triton.next_power_of_2(C)
    with interpreted_stdlib(), on_device(x):
        _kernels(interpreting())[0][(M,)](
            x2, x2 if r2 is None else r2, weight.contiguous(), y2, h2, rstd, C,
            x2.stride(0), 0 if r2 is None else r2.stride(0), y2.stride(0), h2.stride(0), float(eps),
            HAS_RES=r2 is not None, BLOCK_C=bc, num_warps=_warps(bc))
    return y, h, rstd


def rms_norm_bwd_triton(h, weight, rstd, gy, gh=None):
    """Launch the backward: (dx shaped like h in h's dtype, dweight (C,) float32)."""
    C = h.shape[-1]
    h2 = h.contiguous().view(-1, C)
    gy2 = gy.contiguous().view(-1, C)
    gh2 = None if gh is None else gh.contiguous().view(-1, C)
    M = h2.shape[0]
    dx = torch.empty(h2.shape, dtype=h.dtype, device=h.device)
    n_prog = max(1, min(M, 512))
    rows = triton.cdiv(M, n_prog) if M else 0
    n_prog = triton.cdiv(M, rows) if M else 1
    dw = torch.zeros(n_prog, C, dtype=torch.float32, device=h.device)
    if M:
        bc = triton.next_power_of_2(C)
        with interpreted_stdlib(), on_device(h):
            _kernels(interpreting())[1][(n_prog,)](
                h2, gy2, gy2 if gh2 is None else gh2, weight.contiguous(), rstd, dx, dw, M, C, rows,
                HAS_GH=gh2 is not None, BLOCK_C=bc, num_warps=_warps(bc))
    return dx.view(h.shape), dw.sum(0)


class RMSNormFunction(torch.autograd.Function):
    """Autograd through the kernels; with a residual, dx = dr = d(h)."""

    @staticmethod
    def forward(ctx, x, weight, residual, eps):
        y, h, rstd = rms_norm_fwd_triton(x, weight, eps, residual)
        ctx.save_for_backward(x if h is None else h, weight, rstd)
        ctx.has_res = residual is not None
        if h is None:
            return y
        return y, h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, *rest):
        h, weight, rstd = ctx.saved_tensors
        gh = rest[0] if rest else None
        if gy is None:
            gy = torch.zeros(h.shape, dtype=torch.promote_types(h.dtype, weight.dtype), device=h.device)
        dx, dw = rms_norm_bwd_triton(h, weight, rstd, gy, gh)
        dw = dw.to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, (dx if ctx.has_res else None), None


# ----------------------------------------------------------------------------- public

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, residual: torch.Tensor | None = None):
    """`dar_fast.ops.rms_norm`: y, or (y, h = x + residual). See the module docstring."""
    if x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight must be ({x.shape[-1] if x.dim() else '?'},) for x of shape "
                         f"{tuple(x.shape)}, got {tuple(weight.shape)}")
    if not x.is_floating_point() or not weight.is_floating_point():
        raise TypeError("rms_norm: x and weight must be floating point")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"rms_norm: residual must match x ({tuple(x.shape)}, {x.dtype}), got "
                         f"({tuple(residual.shape)}, {residual.dtype})")
    if weight.device != x.device or (residual is not None and residual.device != x.device):
        raise ValueError("rms_norm: x, weight and residual must be on one device")
    if not use_kernel("rms_norm", x, weight, residual):
        return rms_norm_ref(x, weight, eps, residual)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, residual))
    if needs_grad:
        return RMSNormFunction.apply(x, weight, residual, eps)
    y, h, _ = rms_norm_fwd_triton(x, weight, eps, residual)
    return y if residual is None else (y, h)
