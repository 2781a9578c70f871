"""Attention backends: PyTorch SDPA (default everywhere), flash-attn or xformers when installed.

`attend(q, k, v, mask=None, is_causal=False)` takes (B,T,H,hd) / (B,S,H,hd) and returns (B,T,H,hd).
DAR_FAST_ATTENTION=auto|sdpa|flash|xformers picks the backend. `auto` uses flash-attn for the
calls it covers (CUDA, fp16/bf16, no arbitrary mask, head_dim <= 256) when the package imports,
then xformers under the same conditions, else SDPA, which on Hopper already runs
FlashAttention-2-class kernels; the packages matter most for older torch builds. A backend asked
for by name but not installed is an error naming the package to install (`pip install dar-fast[attn]`).
Masked calls (the encoder's patch/query mask, the KV-cache decode) always use SDPA.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

_CHOICES = ("auto", "sdpa", "flash", "xformers")


@functools.lru_cache(None)
def _flash():
    try:
        from flash_attn import flash_attn_func
        return flash_attn_func
    except Exception:
        return None


@functools.lru_cache(None)
def _xformers():
    try:
        import xformers.ops as xops
        return xops
    except Exception:
        return None


def backend() -> str:
    b = os.environ.get("DAR_FAST_ATTENTION", "auto").strip().lower()
    if b not in _CHOICES:
        raise ValueError(f"DAR_FAST_ATTENTION={b!r}: expected one of {_CHOICES}")
    if b == "flash" and _flash() is None:
        raise RuntimeError("DAR_FAST_ATTENTION=flash but flash-attn is not installed (pip install flash-attn, "
                           "or the dar-fast[attn] extra)")
    if b == "xformers" and _xformers() is None:
        raise RuntimeError("DAR_FAST_ATTENTION=xformers but xformers is not installed (pip install xformers, "
                           "or the dar-fast[attn] extra)")
    return b


def _packaged_ok(q, mask) -> bool:
    return q.is_cuda and mask is None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256


def attend(q, k, v, mask=None, is_causal=False, dropout_p: float = 0.0):
    b = backend()
    if b != "sdpa" and _packaged_ok(q, mask):
        if b in ("auto", "flash") and _flash() is not None:
            return _flash()(q, k, v, dropout_p=dropout_p, causal=is_causal)
        if b in ("auto", "xformers") and _xformers() is not None:
            xops = _xformers()
            bias = xops.LowerTriangularMask() if is_causal else None
            return xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout_p)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p)
    return o.transpose(1, 2)
