"""Transformer pieces shared by the tokenizer encoder, its causal decoder layers and the pixel DiT."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dar_fast import ops
from dar_fast.attention import attend

LN_EPS = 1e-6   # every LayerNorm in the released tokenizer uses eps 1e-6


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters (eps 1e-6) over the last dim."""
    return F.layer_norm(x, x.shape[-1:], eps=LN_EPS)


def rope_table(pos: torch.Tensor, head_dim: int, base: float):
    """(cos, sin), each (T, head_dim/2) float32, of the RoPE positions pos (T,) / (T,P): computed once per
    grid instead of once per call; bit-identical to what the RoPE reference computes per call."""
    from dar_fast.kernels.rope import rope_angles
    ang = rope_angles(pos if pos.dim() == 2 else pos[:, None], head_dim, base)
    return torch.cos(ang), torch.sin(ang)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B,T,H,D) rotated pairwise (2i, 2i+1) by the table rows (T,D/2), in float32 as the reference."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([c * x0 - s * x1, s * x0 + c * x1], dim=-1).reshape(x.shape).to(x.dtype)


class FusedWeights:
    """A concatenated copy of several Linear layers' weights (and biases) along the output dim, for inference.

    Not a parameter or buffer: state dicts, optimizers and distributed checkpoints see only the original
    layers. `get()` rebuilds the copy (in place, so its address stays fixed for captured graphs) whenever a
    source tensor's version counter, address or dtype changed; under torch.compile it returns the copy
    as is (`refresh()` before running compiled code)."""

    def __init__(self, *layers: nn.Linear):
        self.layers = layers
        self.weight = self.bias = None
        self._key = None

    def _state(self):
        ts = [t for l in self.layers for t in (l.weight, l.bias) if t is not None]
        return tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in ts)

    def refresh(self):
        key = self._state()
        if key == self._key:
            return
        with torch.no_grad():
            w = torch.cat([l.weight for l in self.layers], dim=0)
            b = None if self.layers[0].bias is None else torch.cat([l.bias for l in self.layers], dim=0)
            if self.weight is not None and self.weight.shape == w.shape and self.weight.dtype == w.dtype \
                    and self.weight.device == w.device:
                self.weight.copy_(w)
                if b is not None:
                    self.bias.copy_(b)
            else:
                self.weight, self.bias = w, b
        self._key = key

    def get(self):
        if not torch.compiler.is_compiling():
            self.refresh()
        return self.weight, self.bias


def refresh_fused(*modules: nn.Module):
    """Bring every fused weight copy inside `modules` up to date (the engine calls it before compiled steps)."""
    for m in modules:
        for sub in m.modules():
            f = getattr(sub, "_fused", None)
            if isinstance(f, FusedWeights):
                f.refresh()


class Attention(nn.Module):
    """Multi-head attention with per-head LayerNorm on q and k (head_dim 64), optional RoPE.

    Self-attention when `context` is None, cross-attention over `context` otherwise
    (RoPE then rotates the queries only: the keys are condition tokens without a grid).
    """

    def __init__(self, dim: int, head_dim: int = 64, rope_base: float = 10000.0):
        super().__init__()
        self.num_heads, self.head_dim = dim // head_dim, head_dim
        self.rope_base = float(rope_base)   # the released `rope_base_len` (theta of the 2D RoPE)
        self.dim = dim
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        # inference: q, k, v merged into one (3D, D) copy (`fused_qkv`): self-attention is one GEMM reading x
        # once, cross-attention two. The parameters (what training, checkpoints and optimizers see) stay the
        # released q / k / v; the copy follows them (rebuilt when their version counters move).
        self._fused = FusedWeights(self.q, self.k, self.v)
        self.q_norm = nn.LayerNorm(head_dim, eps=LN_EPS)
        self.k_norm = nn.LayerNorm(head_dim, eps=LN_EPS)
        self.proj = nn.Linear(dim, dim)

    def project(self, x, context=None):
        """(q, k, v), each (B,·,H,hd), q and k after their per-head LayerNorm."""
        B, T, D = x.shape
        H, hd = self.num_heads, self.head_dim
        S = T if context is None else context.shape[1]
        if torch.is_grad_enabled() and any(p.requires_grad for p in (self.q.weight, self.k.weight, self.v.weight)):
            q = self.q(x).view(B, T, H, hd)                       # training: gradients reach the parameters
            ctx = x if context is None else context
            k, v = self.k(ctx).view(B, S, H, hd), self.v(ctx).view(B, S, H, hd)
        else:
            W, b = self._fused.get()
            if context is None:
                q, k, v = F.linear(x, W, b).view(B, T, 3, H, hd).unbind(2)
            else:
                q = F.linear(x, W[:D], b[:D]).view(B, T, H, hd)
                k, v = F.linear(context, W[D:], b[D:]).view(B, S, 2, H, hd).unbind(2)
        return self.q_norm(q), self.k_norm(k), v

    def forward(self, x, context=None, pos=None, mask=None, is_causal=False, cache=None, start: int = 0):
        """cache=(k_buf, v_buf) of shape (B,H,L,hd): causal self-attention of the T new tokens at slots
        [start, start+T) over every slot before them (the tokenizer's incremental decoder layers)."""
        B, T, D = x.shape
        q, k, v = self.project(x, context)
        if isinstance(pos, tuple):      # (cos, sin) tables built once per grid (`rope_table`)
            q, k_rot = rotate(q, *pos), (rotate(k, *pos) if context is None else None)
            if context is None:
                k = k_rot
        elif pos is not None:
            q, k_rot = ops.apply_rope(q, k if context is None else None, pos, self.rope_base)
            if context is None:
                k = k_rot
        if cache is not None:
            kb, vb = cache
            kb[:, :, start:start + T] = k.transpose(1, 2)
            vb[:, :, start:start + T] = v.transpose(1, 2)
            k, v = kb[:, :, :start + T].transpose(1, 2), vb[:, :, :start + T].transpose(1, 2)
            # new token i sits at slot start+i and sees slots <= start+i
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
            is_causal = False
        # fused attention: the (T x S) map is never materialised
        o = attend(q, k, v, mask=mask, is_causal=is_causal)                          # (B,T,H,hd)
        return self.proj(o.reshape(B, T, D))


class Mlp(nn.Module):
    """D -> 4D -> D with SiLU."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.silu(self.fc1(x)))


class GatedBlock(nn.Module):
    """Pre-LN block with per-channel residual gates: x += g1 * attn(LN(x)); x += g2 * mlp(LN(x))."""

    def __init__(self, dim: int, head_dim: int = 64, rope_base: float = 10000.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attention = Attention(dim, head_dim, rope_base)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, 4 * dim)
        # the released code zero-initialises the gates (each block starts as identity)
        self.gate1 = nn.Parameter(torch.zeros(dim))
        self.gate2 = nn.Parameter(torch.zeros(dim))

    def forward(self, x, pos=None, mask=None, is_causal=False, cache=None, start: int = 0):
        x = x + self.gate1 * self.attention(self.norm1(x), pos=pos, mask=mask, is_causal=is_causal, cache=cache, start=start)
        return x + self.gate2 * self.mlp(self.norm2(x))
