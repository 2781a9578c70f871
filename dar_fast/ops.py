"""Every op of dar-fast, and the one place that decides which implementation of an op runs.

Each op has a fast implementation (a Triton kernel, or the compiled `dar_fast._C` op for the token sampler)
and a plain-PyTorch reference beside it in `dar_fast/kernels/<module>.py`; `OPS` below names both. An op's
public function checks its arguments and then asks `use_kernel(op, *tensors)` which one to run:

    DAR_FAST_BACKEND=auto|torch|triton       every op (default auto)
    DAR_FAST_BACKEND_<OP>                    one op, wins over DAR_FAST_BACKEND (<OP>: a key of OPS, upper case)
    DAR_FAST_ATTENTION=auto|sdpa|flash|xformers
                                             the package behind full-sequence attention (`attention_backend`,
                                             `attention_impl`; dar_fast/attention.py calls the packages)

`auto` runs the kernel on CUDA tensors and the reference (or, for the sampler, the compiled CPU op)
otherwise; `triton` on CPU tensors needs TRITON_INTERPRET=1 (how the tests run the kernels). docs/environment.md
lists the variables with every other switch.

    vq_nearest(z, codebook)                        fused l2-normalised nearest code (Triton)
    apply_rope(q, k, pos)                          2D / 1D / identity RoPE over q and k in one pass (Triton)
    flow_step(x, v, v_prev, t, t_next)             Euler / Adams-Bashforth update (Triton)
    flow_preview(x, v, v_prev, t)                  the same update to t = 1 (Triton; image / uint8 output fused)
    sample_tokens(logits, uncond, cfg, ...)        CFG + temperature + top-k/top-p + keyed Philox draw (C++/CUDA)
    images_to_uint8(img)                           (B,3,H,W) in [-1,1] -> (B,H,W,3) uint8, the released clamp(127.5x+128) truncation
    decode_attention(q, k_cache, v_cache, len)    one query per row over the used KV prefix, split-K, GQA (Triton)
    sample_noise(seeds, ids, shape, device)        keyed Gaussian noise, the same bits on CPU and GPU (Triton)
    rms_norm(x, weight, eps, residual=None)        RMSNorm, optionally fused with the residual add -> (y, x + r) (Triton)
    adaln_modulate(x, shift, scale)                DiT LayerNorm + (1 + scale) * x + shift in one pass (Triton)
    gated_residual(x, gate, y, shift, scale)       x + gate * y, optionally fused with the next adaln_modulate (Triton)
    swiglu(x13)                                    silu(a) * b over the halves of a merged [w1; w3] output (Triton)

The public functions are imported on first use: the kernel modules import this one for `use_kernel`, so
importing them here eagerly would be circular.
"""
from __future__ import annotations

import importlib
import os
from typing import NamedTuple, Optional

import torch

from dar_fast.kernels.backend import triton_available

CHOICES = ("auto", "torch", "triton")
ATTENTION_CHOICES = ("auto", "sdpa", "flash", "xformers")


class Op(NamedTuple):
    module: str                 # dar_fast.kernels.<module>
    kernel: str                 # the fast implementation (a function of the module, or the compiled op)
    reference: str              # the plain-PyTorch reference, a function of the module
    runs: str                   # "triton": a Triton kernel; "compiled": dar_fast._C (CPU and CUDA)
    available: Optional[str] = None   # compiled ops: the module's `(device) -> bool` check of the build


# The registry: op name (the <OP> of DAR_FAST_BACKEND_<OP>, lower case) -> its implementations.
OPS = {
    "vq_nearest": Op("vq_nearest", "vq_nearest_triton", "vq_nearest_ref", "triton"),
    "rope": Op("rope", "rope_triton", "apply_rope_ref", "triton"),
    "flow_step": Op("flow_step", "flow_step_triton", "flow_output_ref", "triton"),
    "sample_tokens": Op("sample_tokens", "torch.ops.dar_fast.sample_tokens", "sample_tokens_ref", "compiled",
                        available="_ext_ready"),
    "decode_attention": Op("decode_attention", "decode_attention_triton", "decode_attention_ref", "triton"),
    "noise": Op("noise", "keyed_normal_triton", "keyed_normal_ref", "triton"),
    "rms_norm": Op("rms_norm", "rms_norm_fwd_triton", "rms_norm_ref", "triton"),
    "adaln": Op("adaln", "adaln_fwd_triton", "adaln_modulate_ref", "triton"),
    "swiglu": Op("swiglu", "swiglu_fwd_triton", "swiglu_ref", "triton"),
}

# Full-sequence attention: package name -> (loader in dar_fast.attention returning the package or None, what
# to install). SDPA is always there; `auto` tries these in order for the calls they cover.
ATTENTION = {
    "flash": ("_flash", "flash-attn"),
    "xformers": ("_xformers", "xformers"),
}

# public name -> (module under dar_fast/, attribute)
_PUBLIC = {
    "vq_nearest": ("kernels.vq_nearest", "vq_nearest"),
    "apply_rope": ("kernels.rope", "apply_rope"),
    "grid_positions": ("kernels.rope", "grid_positions"),
    "flow_step": ("kernels.flow_step", "flow_step"),
    "flow_preview": ("kernels.flow_step", "flow_preview"),
    "images_to_uint8": ("kernels.flow_step", "images_to_uint8_ref"),
    "sample_tokens": ("kernels.sample_tokens", "sample_tokens"),
    "decode_attention": ("kernels.decode_attention", "decode_attention"),
    "sample_noise": ("seeding", "sample_noise"),
    "rms_norm": ("kernels.rms_norm", "rms_norm"),
    "adaln_modulate": ("kernels.adaln", "adaln_modulate"),
    "gated_residual": ("kernels.adaln", "gated_residual"),
    "swiglu": ("kernels.swiglu", "swiglu"),
}


__all__ = ["OPS", "ATTENTION", "Op", "use_kernel", "requested", "triton_available", "reference",
           "attention_backend", "attention_impl", *_PUBLIC]


def __getattr__(name):
    if name in _PUBLIC:
        mod, attr = _PUBLIC[name]
        value = getattr(importlib.import_module(f"dar_fast.{mod}"), attr)
        globals()[name] = value           # later lookups skip this function
        return value
    raise AttributeError(f"module 'dar_fast.ops' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))


# ====================================================================================== kernels
def requested(op: str) -> str:
    """The implementation the environment asks for `op`: 'auto', 'torch' or 'triton'."""
    var = f"DAR_FAST_BACKEND_{op.upper()}"
    val = os.environ.get(var) or os.environ.get("DAR_FAST_BACKEND") or "auto"
    val = val.strip().lower()
    if val not in CHOICES:
        raise ValueError(f"DAR_FAST_BACKEND{'_' + op.upper() if os.environ.get(var) else ''}={val!r}: "
                         f"expected one of {CHOICES}")
    return val


def use_kernel(op: str, *tensors) -> bool:
    """True when `op` should run its fast implementation on these tensors (None entries are skipped; a
    compiled op may be given the torch.device instead), False for the reference."""
    spec = OPS[op]
    want = requested(op)
    if want == "torch":
        return False
    if spec.runs == "compiled":
        # `triton` has no meaning for the compiled op: it runs the compiled op, as `auto` does
        dev = tensors[0] if isinstance(tensors[0], torch.device) else tensors[0].device
        if dev.type not in ("cpu", "cuda"):
            return False
        return getattr(importlib.import_module(f"dar_fast.kernels.{spec.module}"), spec.available)(dev)
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if want == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: DAR_FAST_BACKEND asks for triton but triton is not installed (pip install triton)")
        if not on_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(f"{op}: triton backend on CPU tensors needs TRITON_INTERPRET=1")
        return True
    return on_cuda and triton_available()


def reference(op: str):
    """The plain-PyTorch reference of `op` (the function the kernel is tested against)."""
    spec = OPS[op]
    return getattr(importlib.import_module(f"dar_fast.kernels.{spec.module}"), spec.reference)


# ====================================================================================== attention
def _attention_loader(name: str):
    # looked up on every call (not bound once) so a test can stand in for a missing package
    return getattr(importlib.import_module("dar_fast.attention"), ATTENTION[name][0])


def attention_backend() -> str:
    """DAR_FAST_ATTENTION, checked: a package asked for by name must import."""
    b = os.environ.get("DAR_FAST_ATTENTION", "auto").strip().lower()
    if b not in ATTENTION_CHOICES:
        raise ValueError(f"DAR_FAST_ATTENTION={b!r}: expected one of {ATTENTION_CHOICES}")
    if b in ATTENTION and _attention_loader(b)() is None:
        pkg = ATTENTION[b][1]
        raise RuntimeError(f"DAR_FAST_ATTENTION={b} but {pkg} is not installed (pip install {pkg}, "
                           "or the dar-fast[attn] extra)")
    return b


def attention_impl(q, mask=None) -> str:
    """'flash', 'xformers' or 'sdpa': what full-sequence attention runs for queries like q. The packages cover
    CUDA fp16/bf16 calls without an arbitrary mask and head_dim <= 256; everything else is SDPA (which on
    Hopper already runs FlashAttention-2-class kernels)."""
    b = attention_backend()
    if b == "sdpa":
        return "sdpa"
    covered = q.is_cuda and mask is None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
    if covered:
        for name in ATTENTION:
            if b in ("auto", name) and _attention_loader(name)() is not None:
                return name
    return "sdpa"
