"""Rotary position embedding for D-AR: 2D (patch tokens), 1D (AR tokens), identity (query tokens).

Layout. q is (B, T, Hq, D) and k is (B, T, Hk, D) (any strides: views into a
fused qkv projection are fine). `pos` is a per-token integer table (T, P):
  P == 1  1D: all D dims rotate by pos[t, 0], pair (2i, 2i+1) by angle
          pos * base^(-2i/D)  (the Llama/LlamaGen layout);
  P == 2  2D: dims [0, D/2) rotate by the row pos[t, 0], dims [D/2, D) by the
          column pos[t, 1]; inside each half pair (2i, 2i+1) by angle
          pos * base^(-2i/(D/2))  (the released tokenizer's layout);
  a row whose entries are negative is left unrotated (query tokens).
Rotation of a pair (x0, x1) by a: (cos a * x0 - sin a * x1, sin a * x0 + cos a * x1),
computed in float32 whatever the input dtype, as the released code does.

Where the kernel is fast, and why it stops being fast
-----------------------------------------------------
RoPE is pure data movement: 2 reads + 2 writes of each pair and ~6 FLOP, so
the floor is bytes / HBM bandwidth. The reference makes ~10 passes over q and
k (float copies, the pair split, four products, stack, cast) plus the angle
table; the kernel makes one: a program per token (b, t) computes that token's
D/2 angles in fp32 from pos (the inverse frequencies come from rope_freqs, so
the angles are bit-identical to the reference), their cos/sin once (libdevice,
full precision), and rotates every q and k head of the token with them,
reading and writing through arbitrary strides (views into a fused qkv output
need no copy). Forward and backward are the same kernel (backward rotates by
-angle).
It stops being fast when
  * there are few tokens (AR decode: B*T = 128 programs of 32 heads): the
    launch (~3-5 us, a typical figure, not timed here) dominates and the GPU is mostly idle; only fusing RoPE
    into the qkv GEMM epilogue or capturing the step in a CUDA graph helps;
  * the head dim is tiny (each program then moves few bytes; the per-token
    sin/cos, D/2 of them per program, start to show);
  * the last dim is not contiguous (stride(-1) != 1): loads stay correct but
    lose coalescing.
"""
from __future__ import annotations

import functools
import sys

import torch

from dar_fast.kernels._interp import interpreted_stdlib, interpreting, on_device
from dar_fast.ops import use_kernel

try:  # optional: the module must import (and the reference run) without triton
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    libdevice = None


# ----------------------------------------------------------------------------- reference

def rope_freqs(dim: int, base: float = 10000.0, device=None) -> torch.Tensor:
    """(dim//2,) float32 inverse frequencies base^(-2i/dim)."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))


def rope_angles(pos: torch.Tensor, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """(T, head_dim//2) float32 rotation angle of every pair; identity rows get angle 0."""
    T, P = pos.shape
    sub = head_dim // P                               # dims driven by each position column
    if sub * P != head_dim or sub % 2:
        raise ValueError(f"head_dim {head_dim} does not split into {P} even parts for RoPE")
    f = rope_freqs(sub, base, pos.device)             # (sub/2,)
    ang = pos.clamp_min(0).to(torch.float32)[:, :, None] * f  # (T, P, sub/2)
    ang = torch.where((pos < 0)[:, :, None], torch.zeros_like(ang), ang)
    return ang.reshape(T, head_dim // 2)


def _rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B,T,H,D); cos/sin (T, D/2)
    xf = x.float().reshape(*x.shape[:-1], -1, 2)       # (B,T,H,D/2,2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([c * x0 - s * x1, s * x0 + c * x1], dim=-1)
    return out.reshape(x.shape).to(x.dtype)


def apply_rope_ref(q: torch.Tensor, k: torch.Tensor | None, pos: torch.Tensor, base: float = 10000.0):
    """Plain-PyTorch reference: returns (q_rot, k_rot) (k_rot None when k is None)."""
    if pos.dim() == 1:
        pos = pos[:, None]
    ang = rope_angles(pos, q.shape[-1], base)
    cos, sin = torch.cos(ang), torch.sin(ang)
    return _rotate_ref(q, cos, sin), (None if k is None else _rotate_ref(k, cos, sin))


def grid_positions(h: int, w: int, num_identity: int = 0, device=None) -> torch.Tensor:
    """(h*w + num_identity, 2) int32 table: raster (row, col) for patches, then -1 rows for queries."""
    r = torch.arange(h, device=device).repeat_interleave(w)
    c = torch.arange(w, device=device).repeat(h)
    pos = torch.stack([r, c], dim=1)
    if num_identity:
        pos = torch.cat([pos, torch.full((num_identity, 2), -1, device=device, dtype=pos.dtype)])
    return pos.to(torch.int32)


# ----------------------------------------------------------------------------- kernel

def _rotate_heads(x_ptr, o_ptr, H, sh, sd, soh, sod, c, s,
                  BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, HALF_D: tl.constexpr):
    """Rotate heads 0..H-1 of one token: x_ptr/o_ptr point at the token, c/s are (1, BLOCK_P).

    Each block of heads is read as whole contiguous rows (vector loads when
    stride(-1) == 1) and split into the (even, odd) halves of its pairs.
    """
    e = tl.arange(0, 2 * BLOCK_P)
    e_ok = e < 2 * HALF_D
    hh = tl.arange(0, BLOCK_H)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + hh
        m = (h < H)[:, None] & e_ok[None, :]
        x = tl.load(x_ptr + h[:, None] * sh + e[None, :] * sd, mask=m, other=0.0).to(tl.float32)
        x0, x1 = tl.split(tl.reshape(x, (BLOCK_H, BLOCK_P, 2)))      # elements 2j and 2j+1
        o = tl.reshape(tl.join(c * x0 - s * x1, s * x0 + c * x1), (BLOCK_H, 2 * BLOCK_P))
        tl.store(o_ptr + h[:, None] * soh + e[None, :] * sod, o.to(o_ptr.dtype.element_ty), mask=m)


def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, freq_ptr, T, Hq, Hk,
                 sqb, sqt, sqh, sqd, skb, skt, skh, skd,
                 sob, sot, soh, sod, sgb, sgt, sgh, sgd,
                 spt, spp,
                 HALF_D: tl.constexpr, HALF_SUB: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr,
                 HAS_K: tl.constexpr, INVERSE: tl.constexpr, PRECISE_TRIG: tl.constexpr):
    """One program per token (b, t): its D/2 angles, cos/sin, then every q head and every k head.

    Strides: q (sq*), k (sk*), q out (so*), k out (sg*), pos (spt, spp); pair j
    of a head is elements (2j, 2j+1) and is driven by pos column j // HALF_SUB
    at inverse frequency freq[j % HALF_SUB].
    """
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    j = tl.arange(0, BLOCK_P)
    j_ok = j < HALF_D
    p = tl.load(pos_ptr + t * spt + (j // HALF_SUB) * spp, mask=j_ok, other=0)
    inv = tl.load(freq_ptr + j % HALF_SUB, mask=j_ok, other=0.0)
    ang = tl.maximum(p, 0).to(tl.float32) * inv                     # same rounding as rope_angles
    ang = tl.where(p < 0, 0.0, ang)
    if PRECISE_TRIG:
        c = libdevice.cos(ang)
        s = libdevice.sin(ang)
    else:  # the interpreter has no libdevice (numpy's cos/sin there)
        c = tl.cos(ang)
        s = tl.sin(ang)
    if INVERSE:
        s = -s
    _rotate_heads(q_ptr + b * sqb + t * sqt, qo_ptr + b * sob + t * sot, Hq, sqh, sqd, soh, sod,
                  c[None, :], s[None, :], BLOCK_H, BLOCK_P, HALF_D)
    if HAS_K:
        _rotate_heads(k_ptr + b * skb + t * skt, ko_ptr + b * sgb + t * sgt, Hk, skh, skd, sgh, sgd,
                      c[None, :], s[None, :], BLOCK_H, BLOCK_P, HALF_D)


if triton is not None:
    _rotate_heads = triton.jit(_rotate_heads)


@functools.lru_cache(maxsize=None)
def _kernel(interpret: bool):
    """The jitted kernel; built per TRITON_INTERPRET mode (triton.jit reads it at decoration)."""
    return triton.jit(_rope_kernel)


_FREQ_CACHE: dict = {}


def _inv_freqs(sub: int, base: float, device: torch.device) -> torch.Tensor:
    """rope_freqs(sub, base, device), cached (not while a CUDA graph is being captured)."""
    key = (sub, float(base), str(device))
    f = _FREQ_CACHE.get(key)
    if f is None:
        f = rope_freqs(sub, base, device)
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if not capturing:
            _FREQ_CACHE[key] = f
    return f


# ----------------------------------------------------------------------------- host launcher

def rope_triton(q: torch.Tensor, k: torch.Tensor | None, pos: torch.Tensor, base: float = 10000.0, *,
                inverse: bool = False, out_q: torch.Tensor | None = None, out_k: torch.Tensor | None = None):
    """Launch the kernel (inputs already checked, pos (T, P) on q's device).

    Writes into out_q/out_k when given (in place when they are q/k), else into
    new contiguous tensors of q's/k's dtype. inverse=True rotates by -angle.
    """
    B, T, Hq, D = q.shape
    P = pos.shape[1]
    sub = D // P
    freqs = _inv_freqs(sub, base, q.device)
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out_q is None else out_q
    if k is None:
        kk, ko, Hk = q, qo, 0
    else:
        kk = k
        ko = torch.empty(k.shape, dtype=k.dtype, device=k.device) if out_k is None else out_k
        Hk = k.shape[2]
    if B * T == 0:
        return qo, (None if k is None else ko)
    block_h = min(triton.next_power_of_2(max(Hq, Hk)), 16)
    with interpreted_stdlib(sys.modules[__name__]), on_device(q):
        _kernel(interpreting())[(B * T,)](
            q, kk, qo, ko, pos, freqs, T, Hq, Hk,
            *q.stride(), *kk.stride(), *qo.stride(), *ko.stride(), *pos.stride(),
            HALF_D=D // 2, HALF_SUB=sub // 2, BLOCK_P=triton.next_power_of_2(D // 2), BLOCK_H=block_h,
            HAS_K=k is not None, INVERSE=inverse, PRECISE_TRIG=not interpreting(), num_warps=4)
    return qo, (None if k is None else ko)


class RopeFunction(torch.autograd.Function):
    """Autograd through the kernel: the backward of a rotation is the rotation by -angle."""

    @staticmethod
    def forward(ctx, q, k, pos, base):
        ctx.set_materialize_grads(False)      # an unused output's grad stays None, as with the reference
        ctx.save_for_backward(pos)
        ctx.base = base
        return rope_triton(q, k, pos, base)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gq, gk):
        (pos,) = ctx.saved_tensors
        need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gq = gq if need_q else None
        gk = gk if need_k else None
        if gq is None and gk is None:
            return None, None, None, None
        if gq is None:                        # rotate gk alone (it takes q's slot in the launcher)
            return None, rope_triton(gk, None, pos, ctx.base, inverse=True)[0], None, None
        dq, dk = rope_triton(gq, gk, pos, ctx.base, inverse=True)
        return dq, dk, None, None


# ----------------------------------------------------------------------------- public

def _check_rope_inputs(q, k, pos) -> torch.Tensor:
    """Validate; returns pos as (T, P)."""
    if q.dim() != 4:
        raise ValueError(f"apply_rope: q must be (B, T, H, D), got shape {tuple(q.shape)}")
    B, T, _, D = q.shape
    if k is not None:
        if k.dim() != 4 or k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
            raise ValueError(f"apply_rope: k must be (B={B}, T={T}, Hk, D={D}), got shape {tuple(k.shape)}")
        if k.device != q.device:
            raise ValueError(f"apply_rope: q is on {q.device} but k on {k.device}")
    if not q.is_floating_point() or (k is not None and not k.is_floating_point()):
        raise TypeError("apply_rope: q and k must be floating point")
    if pos.dim() == 1:
        pos = pos[:, None]
    if pos.dim() != 2 or pos.shape[0] != T:
        raise ValueError(f"apply_rope: pos must be (T,) or (T, P) with T={T}, got shape {tuple(pos.shape)}")
    P = pos.shape[1]
    if P == 0 or D % P or (D // P) % 2:
        raise ValueError(f"head_dim {D} does not split into {P} even parts for RoPE")
    return pos


def apply_rope(q: torch.Tensor, k: torch.Tensor | None, pos: torch.Tensor, base: float = 10000.0,
               inplace: bool = False):
    """Rotate q (B,T,Hq,D) and k (B,T,Hk,D) (or None) by the positions pos (T,) / (T,P): (q_rot, k_rot).

    `dar_fast.ops.apply_rope`. Any strides; output dtype = input dtype, math in
    fp32. inplace=True writes the result into q and k (and returns them) when
    no gradient is needed; with autograd recording it is ignored. pos may live
    on the device (CUDA-graph friendly: nothing is read back to the host).
    """
    pos = _check_rope_inputs(q, k, pos)
    if pos.device != q.device:
        pos = pos.to(q.device)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or (k is not None and k.requires_grad))
    inplace = inplace and not needs_grad
    if use_kernel("rope", q, k, pos):
        if needs_grad:
            return RopeFunction.apply(q, k, pos, base)
        if inplace:
            return rope_triton(q, k, pos, base, out_q=q, out_k=k)
        return rope_triton(q, k, pos, base)
    qr, kr = apply_rope_ref(q, k, pos, base)
    if inplace:
        q.copy_(qr)
        if k is not None:
            k.copy_(kr)
        return q, k
    return qr, kr
