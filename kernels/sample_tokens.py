"""Fused token sampler: CFG combine, temperature, top-k, top-p and a Gumbel-max draw from a
counter-based Philox stream keyed by (seed, sample id, position, vocabulary index).

    sample_tokens(logits, uncond_logits=None, cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0,
                  *, seeds, sample_ids, positions) -> (B,) int64

logits, uncond_logits: (B, V) float tensors (any float dtype; uncond_logits None = no guidance).
cfg_scale: float, or a 0-dim / (B,) tensor (one scale per row, e.g. a CFG schedule).
temperature: float > 0.  top_k: int >= 0 (0 = off).  top_p: float in (0, 1] (1 = off).
seeds, sample_ids: (B,) integer tensors.  positions: int, or a 0-dim / (B,) integer tensor.
All tensors on logits' device; nothing is read back to the host, so one captured CUDA graph
serves every decode step (positions and cfg_scale may live on the device).

Semantics (`sample_tokens_ref` below is the executable spec; C++ and CUDA give the same bits)
------------------------------------------------------------------------------------------
Per row b, over vocabulary entries i = 0..V-1:
 1. Guidance, in float32: c = float32(logits), u = float32(uncond_logits), s = float32(cfg_scale),
    l = u + (c - u) * s, evaluated as written (two roundings, no FMA); l = c without uncond.
 2. Temperature: l = l / float32(temperature) (IEEE float32 division; skipped when it is 1).
 3. Top-k (0 < k < V): t = the k-th largest l (with multiplicity); tokens with l < t -> -inf
    (ties at the boundary are kept, so more than k tokens may survive).
 4. Top-p (p < 1): with m = max l and d_i = float64(l_i) - float64(m), each token gets the
    integer mass q_i = floor(exp(d_i) * 2^31) (0 when d_i < -22 or l_i = -inf), exp being
    `_exp_f64_scaled` (fdlibm's exp as fixed IEEE float64 ops). Sort q descending, cum_j its prefix
    sums (exact int64); n = the smallest j with float64(cum_j) >= p * float64(sum q); keep the
    tokens with q_i >= q_(n), the others -> -inf. So the kept set is the smallest head of the
    sorted softmax whose mass reaches p, ties included; masses are exact integers, so the set
    does not depend on summation order (the CUDA kernel finds q_(n) by a threshold search and
    block reductions; float64 probabilities summed in another order could flip tokens at the
    boundary). Tokens below 2^-31 of the top probability (q = 0) are always dropped when p < 1.
 5. Draw: token = argmax_i (float64(l_i) + g_i), lowest index on ties (a row that is all -inf
    gives 0), with Gumbel noise g_i = -log(-log(u_i)) in float64, u_i = (x_i + 0.5) * 2^-32,
    x_i = word i % 4 of Philox4x32-10(counter = (i // 4, position, sid_lo, sid_hi),
    key = (seed_lo, seed_hi)), where *_lo / *_hi are the low / high 32 bits of the int64 seed
    and sample id (two's complement) and position is taken modulo 2^32. log is `_log_f64`
    (fdlibm's log as fixed IEEE float64 ops, < 1 ulp).
    argmax(l + Gumbel) is an exact draw from softmax(l) (the Gumbel-max trick).
Every draw depends on (seed, sample id, position, i) and the row's own logits only: a row gives
the same token alone or inside any batch, in any order, on CPU or GPU, for any number of GPUs.
exp and log are written out as IEEE operations instead of calling a math library so that this
holds bit for bit (libm, Sleef and CUDA's exp/log differ in the last ulp). A NaN or +inf logit
(e.g. from a temperature so small that l / T overflows) gives an unspecified token.

Where the kernels are fast, and why they stop being fast
---------------------------------------------------------
(CUDA figures are estimates: the kernel has not been timed yet; benchmarks/bench_sample_tokens.py
measures them.) Without top-k/top-p, the CUDA kernel (one 512-thread block per row) reads the
logits once and writes 8 bytes per row: at V = 16384 with CFG in bf16 that is 64 KiB per row, so
B = 256 is ~16 MiB, ~6 us at 3 TB/s (16384 x 2 x 2 B = 64 KiB; x 256 = 16 MiB / 3e12 B/s = 5.6 us). Philox costs ~25 integer ops per entry; the two float64 logs
(~60 ops) are only evaluated where a cheap upper bound of the noise (`gumbel_upper_f64` in
csrc/sample_tokens_math.h) could still win the race, a few percent of the entries, and a group
of 4 whose largest logit is more than 23 (the largest possible noise) below the best value so
far skips Philox too. It stops being fast when
  * B is small: one block per row leaves most SMs idle (B = 1 is launch-latency bound);
  * top-k / top-p are on: the row is staged in a float32 (and an int32 mass) scratch and each
    threshold search makes 16 passes over it with a block reduction per pass (2 bits per pass),
    so it costs several times the plain draw (served from L1/L2, not HBM).
The C++ CPU path does the same work row by row (at::parallel_for over rows), with
std::nth_element for top-k and a sort of the non-zero masses for top-p.
"""
from __future__ import annotations

import math
import numbers
import struct
import warnings
from typing import NamedTuple, Optional

import torch

from dar_fast.ops import use_kernel

__all__ = ["sample_tokens", "sample_tokens_ref", "philox4x32_10", "philox_words", "gumbel_noise",
           "exp_mass", "extension_status"]

# ----------------------------------------------------------------------------- constants

_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def _f64(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<Q", bits))[0]


# fdlibm e_log.c / e_exp.c constants, by their bits (the same as csrc/sample_tokens_math.h).
_LN2_HI, _LN2_LO = _f64(0x3FE62E42FEE00000), _f64(0x3DEA39EF35793C76)
_INV_LN2 = _f64(0x3FF71547652B82FE)
_LG1, _LG2, _LG3, _LG4 = (_f64(0x3FE5555555555593), _f64(0x3FD999999997FA04),
                          _f64(0x3FD2492494229359), _f64(0x3FCC71C51D8E78AF))
_LG5, _LG6, _LG7 = _f64(0x3FC7466496CB03DE), _f64(0x3FC39A09D078C69F), _f64(0x3FC2F112DF3E5244)
_P1, _P2, _P3 = _f64(0x3FC555555555553E), _f64(0xBF66C16C16BEBD93), _f64(0x3F11566AAF25DE2C)
_P4, _P5 = _f64(0xBEBBBD41C5D26BF1), _f64(0x3E66376972BEA4D0)
_MASS_BITS = 31          # q = floor(exp(d) * 2^31)
_MASS_MIN_D = -22.0      # exp(-22) * 2^31 < 1: q = 0 below
_FLT_MIN = 2.0 ** -126   # smallest normal float32: the smallest temperature accepted
_REF_CHUNK = 1 << 21     # entries per row chunk in the reference (bounds its float64 temporaries)
_OP_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)   # what the compiled op reads

# ----------------------------------------------------------------------------- Philox4x32-10


def _mulhilo32(a: torch.Tensor, m: int):
    """(hi, lo) 32-bit words of a * m for int64 tensors a in [0, 2^32), without int64 overflow."""
    p0 = a * (m & 0xFFFF)                      # < 2^48
    p1 = a * (m >> 16)                         # < 2^48
    mid = p0 + ((p1 & 0xFFFF) << 16)           # < 2^49
    return (p1 >> 16) + (mid >> 32), mid & _MASK32


def _philox_rounds(c0, c1, c2, c3, k0, k1):
    for r in range(10):
        if r:
            k0 = (k0 + _PHILOX_W0) & _MASK32
            k1 = (k1 + _PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(c0, _PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, _PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox4x32_10(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Random123's philox4x32_R(10, ...): (..., 4) counters, (..., 2) keys (int64 holding uint32
    words) -> (..., 4) int64 words."""
    c = [counter[..., j].to(torch.int64) & _MASK32 for j in range(4)]
    k = [key[..., j].to(torch.int64) & _MASK32 for j in range(2)]
    return torch.stack(torch.broadcast_tensors(*_philox_rounds(*c, *k)), dim=-1)


def _lo32(x: torch.Tensor) -> torch.Tensor:
    return x & _MASK32


def _hi32(x: torch.Tensor) -> torch.Tensor:
    return (x >> 32) & _MASK32


def philox_words(seeds: torch.Tensor, sample_ids: torch.Tensor, positions, v0: int, v1: int) -> torch.Tensor:
    """(B, v1 - v0) int64: the uint32 word x_i of every row for vocabulary entries v0 <= i < v1
    (v0 a multiple of 4)."""
    assert v0 % 4 == 0
    B = seeds.shape[0]
    dev = seeds.device
    s = seeds.to(torch.int64).view(B, 1)
    sid = sample_ids.to(torch.int64).view(B, 1)
    if isinstance(positions, torch.Tensor):
        pos = positions.to(torch.int64).reshape(B, 1) & _MASK32
    else:
        pos = torch.full((B, 1), int(positions) & _MASK32, dtype=torch.int64, device=dev)
    g = torch.arange(v0 // 4, (v1 + 3) // 4, dtype=torch.int64, device=dev).view(1, -1)
    words = _philox_rounds(g, pos, _lo32(sid), _hi32(sid), _lo32(s), _hi32(s))
    words = [w.expand(B, g.shape[1]) for w in words]
    return torch.stack(words, dim=2).reshape(B, -1)[:, : v1 - v0]


# ----------------------------------------------------------------------------- exact float64 log / exp


def _log_f64(x: torch.Tensor) -> torch.Tensor:
    """log of positive normal float64 values: fdlibm's general branch, op for op as log_f64 in
    csrc/sample_tokens_math.h (IEEE add/sub/mul/div only, so every device gives the same bits)."""
    bits = x.view(torch.int64)
    hx = bits >> 32
    k = (hx >> 20) - 1023
    hx = hx & 0x000FFFFF
    i = (hx + 0x95F64) & 0x100000
    k = k + (i >> 20)
    f = (((hx | (i ^ 0x3FF00000)) << 32) | (bits & _MASK32)).view(torch.float64) - 1.0
    s = f / (f + 2.0)
    dk = k.to(torch.float64)
    z = s * s
    w = z * z
    t1 = w * (_LG2 + w * (_LG4 + w * _LG6))
    t2 = z * (_LG1 + w * (_LG3 + w * (_LG5 + w * _LG7)))
    R = t2 + t1
    hfsq = (0.5 * f) * f
    return dk * _LN2_HI - ((hfsq - (s * (hfsq + R) + dk * _LN2_LO)) - f)


def gumbel_noise(words: torch.Tensor) -> torch.Tensor:
    """float64 Gumbel noise -log(-log((x + 0.5) * 2^-32)) of int64 tensors holding uint32 words."""
    u = (words.to(torch.float64) + 0.5) * (2.0 ** -32)
    return -_log_f64(-_log_f64(u))


def _exp_f64_scaled(d: torch.Tensor):
    """(y, k) with exp(d) = y * 2^k: fdlibm's __ieee754_exp for -22 <= d <= 0, op for op as
    exp_mass in csrc/sample_tokens_math.h."""
    k = torch.trunc(d * _INV_LN2 - 0.5)
    hi = d - k * _LN2_HI
    lo = k * _LN2_LO
    r = hi - lo
    rr = r * r
    c = r - rr * (_P1 + rr * (_P2 + rr * (_P3 + rr * (_P4 + rr * _P5))))
    y = 1.0 - ((lo - (r * c) / (2.0 - c)) - hi)
    return y, k.to(torch.int64)


def exp_mass(d: torch.Tensor) -> torch.Tensor:
    """int64 top-p mass floor(exp(d) * 2^31) of float64 d = l - max l (0 where d < -22 or NaN)."""
    ok = d >= _MASS_MIN_D
    y, k = _exp_f64_scaled(torch.where(ok, d, torch.zeros_like(d)))
    scale = ((k + (1023 + _MASS_BITS)) << 52).view(torch.float64)   # 2^(k+31), exact
    return torch.where(ok, (y * scale).to(torch.int64), 0)


# ----------------------------------------------------------------------------- argument checks


class _Args(NamedTuple):
    logits: torch.Tensor
    uncond: Optional[torch.Tensor]
    scale_t: Optional[torch.Tensor]   # (B,) float32, or None with scale
    scale: float
    temperature: float                # already a float32 value
    top_k: int                        # 0 = off (also when >= V)
    top_p: float
    seeds: torch.Tensor               # (B,) int64
    sample_ids: torch.Tensor          # (B,) int64
    pos_t: Optional[torch.Tensor]     # (B,) int64, or None with pos
    pos: int


def _row_tensor(x, B: int, device, name: str, integer: bool) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"sample_tokens: {name} must be a tensor, got {type(x).__name__}")
    ok_dtype = (not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool) if integer \
        else (x.is_floating_point() or (not x.is_complex() and x.dtype != torch.bool))
    if not ok_dtype:
        raise TypeError(f"sample_tokens: {name} must be an {'integer' if integer else 'real'} tensor, got {x.dtype}")
    if not (x.dim() == 0 or (x.dim() == 1 and x.shape[0] in (1, B))):
        raise ValueError(f"sample_tokens: {name} must have shape ({B},) (one per row), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"sample_tokens: logits are on {device} but {name} is on {x.device}")
    return x.reshape(-1).expand(B)


def _check_args(logits, uncond_logits, cfg_scale, temperature, top_k, top_p, seeds, sample_ids, positions) -> _Args:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"sample_tokens: logits must be a float tensor, got "
                        f"{logits.dtype if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"sample_tokens: logits must be (B, V) with V >= 1, got shape {tuple(logits.shape)}")
    B, V = logits.shape
    if V >= 2 ** 31:
        raise ValueError(f"sample_tokens: vocabulary of {V} entries is too large (at most 2^31 - 1)")
    dev = logits.device
    if uncond_logits is not None:
        if not isinstance(uncond_logits, torch.Tensor) or not uncond_logits.is_floating_point():
            raise TypeError("sample_tokens: uncond_logits must be a float tensor or None")
        if uncond_logits.shape != logits.shape:
            raise ValueError(f"sample_tokens: uncond_logits has shape {tuple(uncond_logits.shape)} but logits "
                             f"{tuple(logits.shape)} (same batch and vocabulary needed)")
        if uncond_logits.device != dev:
            raise ValueError(f"sample_tokens: logits are on {dev} but uncond_logits on {uncond_logits.device}")
        if uncond_logits.dtype != logits.dtype:   # each is rounded to float32 first anyway
            logits, uncond_logits = logits.float(), uncond_logits.float()
    if logits.dtype not in _OP_DTYPES:             # e.g. float8: widening to float32 is exact
        logits = logits.float()
        uncond_logits = None if uncond_logits is None else uncond_logits.float()
    scale_t, scale = None, 1.0
    if isinstance(cfg_scale, torch.Tensor):
        scale_t = _row_tensor(cfg_scale, B, dev, "cfg_scale", integer=False).to(torch.float32)
    elif isinstance(cfg_scale, numbers.Real) and not isinstance(cfg_scale, bool):
        scale = float(cfg_scale)
    else:
        raise TypeError(f"sample_tokens: cfg_scale must be a float or a tensor, got {type(cfg_scale).__name__}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"sample_tokens: temperature must be a float, got {type(temperature).__name__}")
    t32 = _to_f32(float(temperature))
    if not (math.isfinite(t32) and t32 >= _FLT_MIN):
        raise ValueError(f"sample_tokens: temperature must be a finite number > 0 (at least {_FLT_MIN:.4g}, "
                         f"the smallest normal float32), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ValueError(f"sample_tokens: top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not (0.0 < float(top_p) <= 1.0):
        raise ValueError(f"sample_tokens: top_p must be a float in (0, 1] (1 = off), got {top_p!r}")
    seeds = _row_tensor(seeds, B, dev, "seeds", integer=True).to(torch.int64)
    sample_ids = _row_tensor(sample_ids, B, dev, "sample_ids", integer=True).to(torch.int64)
    pos_t, pos = None, 0
    if isinstance(positions, torch.Tensor):
        pos_t = _row_tensor(positions, B, dev, "positions", integer=True).to(torch.int64)
    elif isinstance(positions, numbers.Integral) and not isinstance(positions, bool):
        pos = int(positions) & _MASK32
    else:
        raise TypeError(f"sample_tokens: positions must be an int or an integer tensor, got {type(positions).__name__}")
    return _Args(logits, uncond_logits, scale_t, scale, t32, int(top_k) if top_k < V else 0, float(top_p),
                 seeds, sample_ids, pos_t, pos)


def _to_f32(x: float) -> float:
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:
        return math.inf


# ----------------------------------------------------------------------------- reference


def _guided_tempered(a: _Args) -> torch.Tensor:
    """Steps 1-2: (B, V) float32 l."""
    B, V = a.logits.shape
    dev = a.logits.device
    c = a.logits.float()
    if a.uncond is not None:
        u = a.uncond.float()
        s = (a.scale_t if a.scale_t is not None
             else torch.full((B,), a.scale, dtype=torch.float32, device=dev)).view(B, 1)
        l = u + (c - u) * s
    else:
        l = c
    if a.temperature != 1.0:   # a device tensor divisor: true division on every backend (a CPU
        l = l / torch.full((B, 1), a.temperature, dtype=torch.float32, device=dev)   # scalar is a reciprocal on CUDA)
    return l


def _filter(a: _Args, l: torch.Tensor) -> torch.Tensor:
    """Steps 3-4: top-k then top-p, dropped tokens set to -inf."""
    if a.top_k:
        kth = torch.topk(l, a.top_k, dim=1).values[:, -1:]
        l = torch.where(l >= kth, l, -math.inf)
    if a.top_p < 1.0:
        d = l.double() - l.amax(dim=1, keepdim=True).double()
        q = exp_mass(d)                                            # (B, V) int64
        qs = torch.sort(q, dim=1, descending=True).values
        cum = qs.cumsum(dim=1)                                     # exact
        need = cum[:, -1:].double() * a.top_p
        n = (cum.double() < need).sum(dim=1, keepdim=True)         # first j with cum_j >= need
        l = torch.where(q >= qs.gather(1, n), l, -math.inf)
    return l


def _draw(a: _Args, l: torch.Tensor) -> torch.Tensor:
    """Step 5: argmax(l + Gumbel), in row chunks to bound the float64 temporaries."""
    B, V = l.shape
    rows = max(1, _REF_CHUNK // V)
    out = []
    for b0 in range(0, B, rows):
        b1 = min(B, b0 + rows)
        pos = a.pos_t[b0:b1] if a.pos_t is not None else a.pos
        g = gumbel_noise(philox_words(a.seeds[b0:b1], a.sample_ids[b0:b1], pos, 0, V))
        out.append((l[b0:b1].double() + g).argmax(dim=1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64, device=l.device)


def _sample_ref(a: _Args) -> torch.Tensor:
    if a.logits.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=a.logits.device)
    return _draw(a, _filter(a, _guided_tempered(a)))


def sample_tokens_ref(logits, uncond_logits=None, cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0, *,
                      seeds, sample_ids, positions) -> torch.Tensor:
    """Plain-PyTorch reference and spec (see the module docstring): (B,) int64 tokens."""
    return _sample_ref(_check_args(logits, uncond_logits, cfg_scale, temperature, top_k, top_p,
                                   seeds, sample_ids, positions))


# ----------------------------------------------------------------------------- extension

_EXT = None
_EXT_ERROR: Optional[str] = None
_EXT_LOADED = False
_WARNED: set = set()


def _load_ext():
    """dar_fast._C (registers torch.ops.dar_fast.*) or None; loaded once, at import."""
    global _EXT, _EXT_ERROR, _EXT_LOADED
    if not _EXT_LOADED:
        _EXT_LOADED = True
        try:
            from dar_fast import _C  # noqa: F401  (static initialisers register the ops)
            _EXT = _C
            torch.library.register_fake("dar_fast::sample_tokens")(_sample_tokens_fake)
        except Exception as e:  # missing build, ABI mismatch with the installed torch, ...
            _EXT, _EXT_ERROR = None, f"{type(e).__name__}: {e}"
    return _EXT


def _sample_tokens_fake(logits, uncond, scale_t, scale, temperature, top_k, top_p, seeds, sample_ids,
                        positions_t, position):
    """Shape-only implementation for torch.compile / FakeTensor tracing."""
    return logits.new_empty((logits.shape[0],), dtype=torch.int64)


_load_ext()


def extension_status() -> dict:
    """{'built': bool, 'cuda': bool, 'error': str or None}: what dar_fast._C provides here."""
    ext = _load_ext()
    return {"built": ext is not None, "cuda": bool(ext is not None and getattr(ext, "with_cuda", False)),
            "error": _EXT_ERROR}


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=5)   # past _ext_ready, ops.use_kernel, _use_ext: the line in sample_tokens


def _use_ext(device: torch.device) -> bool:
    """True when the compiled op should run for tensors on `device` (decided by `dar_fast.ops.use_kernel`)."""
    return use_kernel("sample_tokens", device)


def _ext_ready(device: torch.device) -> bool:
    """The build check `dar_fast.ops` runs for this op: dar_fast._C loaded, with CUDA for CUDA tensors."""
    ext = _load_ext()
    if ext is None:
        _warn_once("missing", f"dar_fast._C is not available ({_EXT_ERROR}); sample_tokens runs the PyTorch "
                              "reference (same tokens, slower). Build it with `pip install --no-build-isolation -e .`")
        return False
    if device.type == "cuda" and not getattr(ext, "with_cuda", False):
        _warn_once("nocuda", "dar_fast._C was built without CUDA; sample_tokens runs the PyTorch reference on CUDA "
                             "tensors (same tokens, slower)")
        return False
    return True


def sample_tokens(logits, uncond_logits=None, cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0, *,
                  seeds, sample_ids, positions) -> torch.Tensor:
    """Sample one token per row (`dar_fast.ops.sample_tokens`); semantics in the module docstring.

    Runs the C++ op on CPU tensors and the CUDA kernel on CUDA tensors when dar_fast._C is built,
    the PyTorch reference otherwise or with DAR_FAST_BACKEND_SAMPLE_TOKENS=torch (or
    DAR_FAST_BACKEND=torch; `auto` and `triton`, which has no sampler kernel, pick the compiled
    op). All give the same tokens.
    """
    a = _check_args(logits, uncond_logits, cfg_scale, temperature, top_k, top_p, seeds, sample_ids, positions)
    if a.logits.shape[0] and _use_ext(a.logits.device):
        return torch.ops.dar_fast.sample_tokens(a.logits, a.uncond, a.scale_t, a.scale, a.temperature, a.top_k,
                                                a.top_p, a.seeds, a.sample_ids, a.pos_t, a.pos)
    return _sample_ref(a)
