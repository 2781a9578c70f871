"""Full-sequence attention: PyTorch SDPA (default everywhere), flash-attn or xformers when installed.

`attend(q, k, v, mask=None, is_causal=False)` takes (B,T,H,hd) / (B,S,H,hd) and returns (B,T,H,hd).
Which package runs is decided in `dar_fast.ops` (`attention_impl`, from DAR_FAST_ATTENTION=auto|sdpa|flash|xformers):
`auto` uses flash-attn for the calls it covers (CUDA, fp16/bf16, no arbitrary mask, head_dim <= 256) when the
package imports, then xformers under the same conditions, else SDPA, which on Hopper already runs
FlashAttention-2-class kernels; the packages matter most for older torch builds. A package asked for by name
but not installed is an error naming it (`pip install dar-fast[attn]`). Masked calls (the encoder's
patch/query mask, the KV-cache decode) always use SDPA. This module only loads and calls the packages.
"""
from __future__ import annotations

import functools

import torch.nn.functional as F

from dar_fast.ops import attention_backend as backend  # noqa: F401  (the checked DAR_FAST_ATTENTION value)
from dar_fast.ops import attention_impl


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


def attend(q, k, v, mask=None, is_causal=False, dropout_p: float = 0.0):
    impl = attention_impl(q, mask)
    if impl == "flash":
        return _flash()(q, k, v, dropout_p=dropout_p, causal=is_causal)
    if impl == "xformers":
        xops = _xformers()
        bias = xops.LowerTriangularMask() if is_causal else None
        return xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout_p)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p)
    return o.transpose(1, 2)
