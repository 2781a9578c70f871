"""SwiGLU over a merged [w1; w3] projection: silu(a) * b with (a, b) the two halves of x @ w13.T.

    swiglu(x13) -> (..., H)        x13: (..., 2H), a = x13[..., :H], b = x13[..., H:]

Merging w1 and w3 (the Llama FFN's gate and up projections, (H, C) each) into
one (2H, C) matrix at load time turns two GEMMs that read x twice into one;
this op then replaces silu, the product and their temporaries. The reference
is the released FeedForward's `F.silu(w1(x)) * w3(x)`: silu rounded to x13's
dtype, then the product rounded again; the kernel computes both in float32 and
rounds at the same two places. Rows may be strided (a view of a wider buffer);
the last dim must be contiguous (copied otherwise). Forward and backward
(d x13 = [g * b * silu'(a), g * silu(a)]) are kernels: the model trains
through it.

Where the kernel is fast, and why it stops being fast
-----------------------------------------------------
Bandwidth-bound: reads 2H, writes H per row (3 element-moves per output,
6 bytes in bf16). The reference makes 3 passes with two intermediates
(silu: read a, write s; product: read s and b, write y): 5 element-moves
(estimate: counted from the two ops), and 2 launches. Backward: reads a, b, g
and writes 2H (5 moves per output) where autograd makes ~6 passes. At D-AR-L
decode (128 rows, H = 2816, bf16) a forward moves 2.2 MB, ~0.7 us at
3.35 TB/s (estimate: 128 x 2816 x 6 B / 3.35e12 B/s): launch-bound unless
captured in a CUDA graph, or folded into the GEMM epilogue by the compiler.
It stops being fast when
  * the last dim is not contiguous (copied first);
  * H is tiny: each program covers BLOCK = 1024 columns of one row, so rows
    shorter than that leave lanes idle.
Precision: sigmoid uses exp (approximate ex2 on the GPU, ~2 ulp) and an IEEE
division: within an ulp or two of float32 before the final roundings.
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

__all__ = ["swiglu", "swiglu_ref", "merge_w13"]


# ----------------------------------------------------------------------------- reference

def swiglu_ref(x13: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: silu(a) * b over the two halves of the last dim."""
    a, b = x13.chunk(2, dim=-1)
    return F.silu(a) * b


def merge_w13(w1: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """(2H, C) merged weight [w1; w3] (load time; checkpoints keep w1 / w3 and split on save)."""
    if w1.shape != w3.shape:
        raise ValueError(f"merge_w13: w1 {tuple(w1.shape)} and w3 {tuple(w3.shape)} differ")
    return torch.cat([w1, w3], dim=0)


# ----------------------------------------------------------------------------- kernels

def _swiglu_fwd_kernel(x_ptr, y_ptr, H, sx, sy, BLOCK: tl.constexpr):
    """Columns [pid1 * BLOCK, ...) of row pid0: y = round(round(silu(a)) * b)."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < H
    a = tl.load(x_ptr + row * sx + c, mask=m, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + row * sx + H + c, mask=m, other=0.0).to(tl.float32)
    s = tl.div_rn(a, 1.0 + tl.exp(-a))                                 # IEEE division (plain / is approximate)
    s = s.to(x_ptr.dtype.element_ty).to(tl.float32)                    # silu rounded, as F.silu returns it
    tl.store(y_ptr + row * sy + c, (s * b).to(y_ptr.dtype.element_ty), mask=m)


def _swiglu_bwd_kernel(x_ptr, g_ptr, dx_ptr, H, sx, sg, sdx, BLOCK: tl.constexpr):
    """d a = g b sig(a) (1 + a (1 - sig(a))), d b = g silu(a), for columns [pid1 * BLOCK, ...) of row pid0."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < H
    a = tl.load(x_ptr + row * sx + c, mask=m, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + row * sx + H + c, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * sg + c, mask=m, other=0.0).to(tl.float32)
    sig = tl.div_rn(1.0, 1.0 + tl.exp(-a))
    silu = a * sig
    da = g * b * (sig * (1.0 + a * (1.0 - sig)))
    db = g * silu
    tl.store(dx_ptr + row * sdx + c, da.to(dx_ptr.dtype.element_ty), mask=m)
    tl.store(dx_ptr + row * sdx + H + c, db.to(dx_ptr.dtype.element_ty), mask=m)


@functools.lru_cache(maxsize=None)
def _kernels(interpret: bool):
    """The jitted kernels; built per TRITON_INTERPRET mode (triton.jit reads it at decoration)."""
    return triton.jit(_swiglu_fwd_kernel), triton.jit(_swiglu_bwd_kernel)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(M, N) view of a (..., N) tensor, copied only when no such view exists."""
    N = t.shape[-1]
    if t.stride(-1) != 1:
        t = t.contiguous()
    try:
        return t.view(-1, N)
    except RuntimeError:
        return t.reshape(-1, N).contiguous()


_BLOCK = 1024


# ----------------------------------------------------------------------------- host launchers

def swiglu_fwd_triton(x13: torch.Tensor) -> torch.Tensor:
    """Launch the forward (inputs already checked): (..., H) in x13's dtype."""
    H = x13.shape[-1] // 2
    x2 = _rows(x13)
    M = x2.shape[0]
    y = torch.empty(*x13.shape[:-1], H, dtype=x13.dtype, device=x13.device)
    if M and H:
        blk = min(_BLOCK, triton.next_power_of_2(H))
        with interpreted_stdlib(), on_device(x13):
            _kernels(interpreting())[0][(M, triton.cdiv(H, blk))](x2, y.view(-1, H), H, x2.stride(0), H,
                                                                  BLOCK=blk, num_warps=4)
    return y


def swiglu_bwd_triton(x13: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Launch the backward: d x13 (..., 2H) contiguous, in x13's dtype."""
    H = x13.shape[-1] // 2
    x2 = _rows(x13)
    g2 = g.contiguous().view(-1, H)
    M = x2.shape[0]
    dx = torch.empty(x13.shape, dtype=x13.dtype, device=x13.device)
    if M and H:
        blk = min(_BLOCK, triton.next_power_of_2(H))
        with interpreted_stdlib(), on_device(x13):
            _kernels(interpreting())[1][(M, triton.cdiv(H, blk))](x2, g2, dx.view(-1, 2 * H), H, x2.stride(0), H,
                                                                  2 * H, BLOCK=blk, num_warps=4)
    return dx


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x13):
        ctx.save_for_backward(x13)
        return swiglu_fwd_triton(x13)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x13,) = ctx.saved_tensors
        return swiglu_bwd_triton(x13, g)


# ----------------------------------------------------------------------------- public

def swiglu(x13: torch.Tensor) -> torch.Tensor:
    """`dar_fast.ops.swiglu`: silu(x13[..., :H]) * x13[..., H:]. See the module docstring."""
    if x13.dim() < 1 or x13.shape[-1] % 2:
        raise ValueError(f"swiglu: the last dim of x13 must be even (the [w1; w3] halves), got shape {tuple(x13.shape)}")
    if not x13.is_floating_point():
        raise TypeError(f"swiglu: x13 must be floating point, got {x13.dtype}")
    if not use_kernel("swiglu", x13):
        return swiglu_ref(x13)
    if torch.is_grad_enabled() and x13.requires_grad:
        return SwiGLUFunction.apply(x13)
    return swiglu_fwd_triton(x13)
