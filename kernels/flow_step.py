"""Flow-matching solver steps: Euler / two-step Adams-Bashforth update and the jump-to-1 preview.

flow_step(x, v, v_prev, t, t_next)  x + (t_next - t) * d,  d = v (Euler, v_prev None)
                                     or 1.5 v - 0.5 v_prev (Adams-Bashforth)
flow_preview(x, v, v_prev, t)       the same with t_next = 1 (the released clip_steps preview)
t, t_next: Python floats or 0-dim / (B,) tensors (per sample), possibly on the device.
Fused outputs (keyword options, same single pass over memory):
  data_std=s            return the image x_next * (1 / s) (B,C,H,W) instead of x_next (the released
                        decoder multiplies by the reciprocal, rounded to fp32 once);
  data_std=s, to_uint8  return (B,H,W,C) uint8 = trunc(clamp(127.5 * img + 128, 0, 255)) in fp32, the
                        released scripts' conversion (`images_to_uint8_ref`), in NHWC.

Where the kernel is fast, and why it stops being fast
-----------------------------------------------------
Pure streaming: 2 (Euler) or 3 (AB) reads and one write per element, a few
FLOP. The reference makes 4-5 separate passes (1.5v, 0.5v_prev, the
difference, the scale, the add: ~48 bytes per element for fp32 AB instead of
16), plus one for the division and three for the uint8 conversion
(+1, *127.5, clamp, cast, permute-copy). The kernel reads each input once,
computes in fp32 and writes once, so at (64, 3, 256, 256) fp32 it needs ~200 MB,
~70 us at 3 TB/s (estimate: 12.6 M elements x 16 B for three reads and a write = 201 MB, / 3e12 B/s
= 67 us); with to_uint8 it writes 1 byte per element instead of 4.
Times come as scalars or as device pointers (loaded in-kernel), so nothing is
read back to the host and one captured CUDA graph serves every step.
It stops being fast when
  * the tensor is small (one 256x256 image: 0.8 MB, a few us): launch latency
    dominates, which only a CUDA graph around the whole step removes;
  * inputs are not contiguous (they are copied first);
  * to_uint8: each program writes C bytes per pixel at stride C, so stores are
    narrow; they are 1/12 of the traffic (fp32 AB) and merge in L2.
Precision: the math is fp32 whatever the dtype (the reference computes in x's
dtype), rounded once to x's dtype at the end; the flow update itself can differ
from the reference by an ulp on a GPU (FMA contraction of x + dt * d). The uint8
conversion of a given image is exact: compiled, it uses round-to-nearest
multiply and add (libdevice mul_rn / add_rn), which the compiler never fuses
into an FMA, so 127.5 * img + 128 is rounded twice exactly as torch does.
"""
from __future__ import annotations

import functools
import numbers

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


# ----------------------------------------------------------------------------- references

def flow_step_ref(x, v, v_prev, t, t_next):
    """x + (t_next - t) * v (Euler, v_prev None) or x + (t_next - t) * (1.5 v - 0.5 v_prev).

    (B,) tensors t / t_next are per-sample times (broadcast over x's trailing dims).
    """
    d = v if v_prev is None else 1.5 * v - 0.5 * v_prev
    dt = t_next - t
    if isinstance(dt, torch.Tensor) and dt.dim() == 1 and x.dim() > 1:
        dt = dt.view(-1, *([1] * (x.dim() - 1)))      # (B,) -> (B,1,...,1)
    return x + dt * d


def flow_preview_ref(x, v, v_prev, t):
    """The same update straight to t = 1: the released clip_steps preview."""
    return flow_step_ref(x, v, v_prev, t, 1.0)


def images_to_uint8_ref(img: torch.Tensor) -> torch.Tensor:
    """(B,C,H,W) float image in [-1, 1] -> (B,H,W,C) uint8, the released scripts' conversion.

    clamp(127.5 * img + 128, 0, 255) truncated toward zero, in float32 (a bf16/fp16 image is
    widened first; the multiply and the add are rounded separately), then NHWC. Truncating
    127.5 x + 128 rounds 127.5 x + 127.5 to nearest (ADM's (x + 1) * 127.5 truncated is one
    lower on about half of all values).
    """
    if img.dim() != 4:
        raise ValueError(f"images_to_uint8_ref: expected a (B,C,H,W) image batch, got shape {tuple(img.shape)}")
    return (127.5 * img.float() + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _inv_std(data_std):
    """1 / data_std as the released decoder forms it: a Python float reciprocal (one fp32 rounding
    where it meets an fp32 tensor); for a tensor, its fp32 reciprocal."""
    if isinstance(data_std, torch.Tensor):
        return 1.0 / data_std.float()
    return 1.0 / float(data_std)


def flow_output_ref(x, v, v_prev, t, t_next, data_std=None, to_uint8=False):
    """Reference of the fused outputs: flow_step_ref, then / data_std, then images_to_uint8_ref."""
    y = flow_step_ref(x, v, v_prev, t, t_next).to(x.dtype)
    if data_std is None:
        return y
    img = (y * _inv_std(data_std)).to(x.dtype)
    return images_to_uint8_ref(img) if to_uint8 else img


# ----------------------------------------------------------------------------- kernel

def _flow_step_kernel(x_ptr, v_ptr, vp_ptr, out_ptr, t_ptr, tn_ptr, ds_ptr,
                      dt_val, t_val, tn_val, ds_val, t_bs, tn_bs, C, S,
                      HAS_PREV: tl.constexpr, T_PTR: tl.constexpr, TN_PTR: tl.constexpr, DT_HOST: tl.constexpr,
                      DS_PTR: tl.constexpr, PRECISE: tl.constexpr,
                      MODE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Tile (BLOCK_C channels x BLOCK_S positions) of sample b = program_id(1); x viewed as (B, C, S).

    MODE 0: x_next (x's dtype, x's layout); 1: image x_next / data_std; 2: uint8 NHWC image.
    """
    b = tl.program_id(1).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    m = (c < C)[:, None] & (s < S)[None, :]
    off = b * C * S + c[:, None] * S + s[None, :]
    x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + off, mask=m, other=0.0).to(tl.float32)
    if HAS_PREV:
        vp = tl.load(vp_ptr + off, mask=m, other=0.0).to(tl.float32)
        d = 1.5 * v - 0.5 * vp
    else:
        d = v
    if T_PTR:                                  # per-call or per-sample times, read on the device
        t = tl.load(t_ptr + b * t_bs).to(tl.float32)
    else:
        t = t_val
    if TN_PTR:
        tn = tl.load(tn_ptr + b * tn_bs).to(tl.float32)
    else:
        tn = tn_val
    if DT_HOST:                                # both Python floats: dt = t_next - t rounded once, on the host
        dt = dt_val
    else:
        dt = tn - t
    y = x + dt * d
    if MODE == 0:
        tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=m)
    else:
        if DS_PTR:
            inv = tl.div_rn(1.0, tl.load(ds_ptr).to(tl.float32))   # IEEE (plain / may be approximate)
        else:
            inv = ds_val                       # 1 / data_std, rounded to fp32 on the host
        # rounded to x's dtype after the step and after the scale, as the reference (no-ops for fp32)
        xdt = x_ptr.dtype.element_ty
        img = (y.to(xdt).to(tl.float32) * inv).to(xdt).to(tl.float32)
        if MODE == 1:
            tl.store(out_ptr + off, img.to(out_ptr.dtype.element_ty), mask=m)
        else:
            if PRECISE:                        # rounded multiply then rounded add: never an FMA
                w = libdevice.add_rn(libdevice.mul_rn(img, 127.5), 128.0)
            else:                              # the interpreter (numpy) never fuses
                w = img * 127.5 + 128.0
            u = tl.minimum(tl.maximum(w, 0.0), 255.0).to(tl.uint8)                    # truncation
            tl.store(out_ptr + (b * S + s[None, :]) * C + c[:, None], u, mask=m)       # NHWC


@functools.lru_cache(maxsize=None)
def _kernel(interpret: bool):
    """The jitted kernel; built per TRITON_INTERPRET mode (triton.jit reads it at decoration)."""
    return triton.jit(_flow_step_kernel)


def _scalar_or_ptr(a, device: torch.device):
    """(tensor or None, float value, batch stride) for a time / data_std argument."""
    if isinstance(a, torch.Tensor):
        if a.numel() == 1 and a.device.type == "cpu" and device.type != "cpu":
            return None, float(a), 0                 # a CPU scalar costs no device sync
        if a.device != device:
            a = a.to(device)
        if a.dim() == 0 or a.numel() == 1:
            return a.reshape(()), 0.0, 0
        return a, 0.0, a.stride(0)
    return None, float(a), 0


# ----------------------------------------------------------------------------- host launcher

def flow_step_triton(x, v, v_prev, t, t_next, data_std=None, to_uint8=False):
    """Launch the kernel (inputs already checked)."""
    x, v = x.contiguous(), v.contiguous()
    vp = None if v_prev is None else v_prev.contiguous()
    B = x.shape[0]
    if to_uint8:
        _, C, H, W = x.shape
        S = H * W
        out = torch.empty((B, H, W, C), dtype=torch.uint8, device=x.device)
        mode, block_c, block_s = 2, triton.next_power_of_2(C), 256
    else:
        C, S = 1, (x.numel() // B if B else 0)
        out = torch.empty_like(x)
        mode, block_c, block_s = (0 if data_std is None else 1), 1, 1024
    if x.numel() == 0:
        return out
    tp, tv, tbs = _scalar_or_ptr(t, x.device)
    tnp, tnv, tnbs = _scalar_or_ptr(t_next, x.device)
    if data_std is None:
        dsp, dsv = None, 1.0
    elif isinstance(data_std, torch.Tensor) and not (data_std.device.type == "cpu" and x.device.type != "cpu"):
        dsp, dsv, _ = _scalar_or_ptr(data_std, x.device)            # a device scalar: 1 / it in the kernel
    else:
        # host reciprocal: of the Python float as released, of a CPU tensor as the reference does
        dsv = float(1.0 / data_std.float()) if isinstance(data_std, torch.Tensor) else 1.0 / float(data_std)
        dsp = None
    dt = tnv - tv                                   # float64 difference, rounded to fp32 once in the kernel
    with interpreted_stdlib(), on_device(x):
        _kernel(interpreting())[(triton.cdiv(S, block_s), B)](
            x, v, x if vp is None else vp, out,
            x if tp is None else tp, x if tnp is None else tnp, x if dsp is None else dsp,
            dt, tv, tnv, dsv, tbs, tnbs, C, S,
            HAS_PREV=vp is not None, T_PTR=tp is not None, TN_PTR=tnp is not None,
            DT_HOST=tp is None and tnp is None, DS_PTR=dsp is not None, PRECISE=not interpreting(),
            MODE=mode, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=4)
    return out


# ----------------------------------------------------------------------------- public

def _check_time(a, B: int, name: str) -> None:
    if isinstance(a, torch.Tensor):
        if not a.is_floating_point():
            raise TypeError(f"flow_step: {name} must be a float tensor, got {a.dtype}")
        if not (a.dim() == 0 or (a.dim() == 1 and a.shape[0] in (1, B))):
            raise ValueError(f"flow_step: {name} must be a float, a 0-dim or a ({B},) tensor, got shape {tuple(a.shape)}")
    elif not isinstance(a, numbers.Real):
        raise TypeError(f"flow_step: {name} must be a float or a tensor, got {type(a).__name__}")


def _check_flow_inputs(x, v, v_prev, t, t_next, data_std, to_uint8) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0:
        raise TypeError("flow_step: x must be a floating-point tensor with a batch dimension")
    for name, a in (("v", v), ("v_prev", v_prev)):
        if a is None and name == "v_prev":
            continue
        if not isinstance(a, torch.Tensor) or a.shape != x.shape:
            got = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
            raise ValueError(f"flow_step: {name} must have x's shape {tuple(x.shape)}, got {got}")
        if a.device != x.device:
            raise ValueError(f"flow_step: x is on {x.device} but {name} on {a.device}")
    _check_time(t, x.shape[0], "t")
    _check_time(t_next, x.shape[0], "t_next")
    if data_std is not None:
        if isinstance(data_std, torch.Tensor):
            if data_std.numel() != 1:
                raise ValueError(f"flow_step: data_std must be a scalar, got shape {tuple(data_std.shape)}")
        elif not isinstance(data_std, numbers.Real):
            raise TypeError(f"flow_step: data_std must be a float, got {type(data_std).__name__}")
    if to_uint8:
        if data_std is None:
            raise ValueError("flow_step: to_uint8=True needs data_std (the uint8 image is x_next / data_std)")
        if x.dim() != 4:
            raise ValueError(f"flow_step: to_uint8=True needs a (B,C,H,W) batch, got shape {tuple(x.shape)}")


def flow_step(x, v, v_prev, t, t_next, *, data_std=None, to_uint8=False):
    """One Euler (v_prev None) / Adams-Bashforth step from t to t_next (`dar_fast.ops.flow_step`).

    Returns x_next (x's dtype), or with data_std the image x_next / data_std,
    or with to_uint8 as well the (B,H,W,C) uint8 image. Math in fp32 on the
    Triton path; the torch path is `flow_output_ref` (x's dtype, as released).
    """
    _check_flow_inputs(x, v, v_prev, t, t_next, data_std, to_uint8)
    if x.shape[0] <= 65535 and use_kernel("flow_step", x, v, v_prev):      # the batch is grid axis 1
        return flow_step_triton(x, v, v_prev, t, t_next, data_std, to_uint8)
    return flow_output_ref(x, v, v_prev, t, t_next, data_std, to_uint8)


def flow_preview(x, v, v_prev, t, *, data_std=None, to_uint8=False):
    """The step straight to t = 1 (the released preview); same options as flow_step."""
    return flow_step(x, v, v_prev, t, 1.0, data_std=data_std, to_uint8=to_uint8)
