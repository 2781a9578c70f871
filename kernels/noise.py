"""Keyed Gaussian noise: element i of sample (seed, sample id) is a fixed function of (seed, id, i).

    keyed_normal(seeds, sample_ids, n, device=None) -> (B, n) float32

seeds, sample_ids: (B,) integer tensors (int64 two's complement; any device).
Element i (0 <= i < n, n < 2^34) of row b:
  x = word i % 4 of Philox4x32-10(counter = (i // 4, 0xFFFFFFFF, sid_lo, sid_hi),
                                  key = (seed_lo, seed_hi))
  (the token sampler's generator, `kernels/sample_tokens.py`, whose counters carry the token position in
  word 1; positions never reach 2^32 - 1, so the two streams never share a counter),
  u = (x + 0.5) * 2^-32 in (0, 1), exact in float64,
  z = Phi^-1(u) by Wichura's AS241 (PPND16) rational approximations in float64 (relative error ~1e-16),
      with log = fdlibm's log written as IEEE operations (`_log_f64` of the token sampler) and IEEE
      sqrt and division; every operation is a correctly rounded IEEE float64 add, mul, div or sqrt,
      evaluated in a fixed order with no FMA contraction (the kernel is compiled with
      enable_fp_fusion=False), so the CPU reference and the GPU kernel give the same bits;
  out = float32(z) (round to nearest).
u >= 2^-33, so |z| <= 6.34 (Phi^-1(2^-33)): the noise's tails are cut at 6.34 sigma (probability
2.3e-10 per element; ~2 elements of a 50K x 3 x 256 x 256 FID run would have fallen further). AS241's
third branch (r > 5, i.e. u < 1e-11) is therefore never reached and is omitted.
A row's noise depends on its key and i only: the same alone, in any batch, at any batch position, on
CPU (the reference) or GPU (the kernel).

Where the kernel is fast, and why it stops being fast
-----------------------------------------------------
One program per (block of 4 * BLOCK elements, row): Philox (10 rounds of 2 umulhi + xors per 4
elements) and ~70 float64 operations per element (two rational polynomials of degree 7, the log, one
sqrt, one division, the branch select), then one float32 store: 4 bytes written per element, nothing
read. A 256x256 RGB image is 196,608 elements: ~14 MFLOP float64, ~0.4 us at the H100's 34 TFLOP/s
float64 (estimate: 196,608 x 70 / 34e12), against 1-3 ms for the host generator it replaces
(seeded torch.randn per sample, then a host-to-device copy). It stops being fast when
  * the GPU has weak float64 (consumer parts: 1/64 of float32), where it is ~10-50 us per image (estimate:
    14 MFLOP at 0.3-1.4 TFLOP/s float64), still far below the host path;
  * B x n is tiny: one launch (~3 us, a typical figure, not timed here) dominates.
The CPU reference (numpy Philox, torch float64 ops, the tail branch only where used) measured 0.11 s per
3 x 256 x 256 image on this project's shared 2-core CI machine (load average 9), 4 ms per 3 x 32 x 32 digit:
slower than a seeded torch.randn, so on CUDA draw with `seeding.sample_noise(..., device="cuda")` (the kernel)
rather than on the host.
"""
from __future__ import annotations

import functools
import struct
import sys

import numpy as np
import torch

from dar_fast.kernels._interp import interpreted_stdlib, interpreting
from dar_fast.ops import use_kernel
from dar_fast.kernels.sample_tokens import _log_f64

try:  # optional: the module must import (and the reference run) without triton
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

__all__ = ["keyed_normal", "keyed_normal_ref", "ndtri_f64", "NOISE_STREAM", "MAX_ELEMENTS"]

NOISE_STREAM = 0xFFFFFFFF          # Philox counter word 1 of the noise (the token sampler puts positions there)
MAX_ELEMENTS = 1 << 34             # i // 4 must fit counter word 0
_MASK32 = 0xFFFFFFFF


def _f64(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<Q", bits))[0]


# AS241 PPND16 (Wichura 1988) coefficients, lowest degree first.
_A = (3.3871328727963666080e0, 1.3314166789178437745e+2, 1.9715909503065514427e+3, 1.3731693765509461125e+4,
      4.5921953931549871457e+4, 6.7265770927008700853e+4, 3.3430575583588128105e+4, 2.5090809287301226727e+3)
_B = (1.0, 4.2313330701600911252e+1, 6.8718700749205790830e+2, 5.3941960214247511077e+3,
      2.1213794301586595867e+4, 3.9307895800092710610e+4, 2.8729085735721942674e+4, 5.2264952788528545610e+3)
_C = (1.42343711074968357734e0, 4.63033784615654529590e0, 5.76949722146069140550e0, 3.64784832476320460504e0,
      1.27045825245236838258e0, 2.41780725177450611770e-1, 2.27238449892691845833e-2, 7.74545014278341407640e-4)
_D = (1.0, 2.05319162663775882187e0, 1.67638483018380384940e0, 6.89767334985100004550e-1,
      1.48103976427480074590e-1, 1.51986665636164571966e-2, 5.47593808499534494600e-4, 1.05075007164441684324e-9)
_SPLIT1, _CONST1, _CONST2 = 0.425, 0.180625, 1.6

# fdlibm log constants (the token sampler's, by their bits)
_LN2_HI, _LN2_LO = _f64(0x3FE62E42FEE00000), _f64(0x3DEA39EF35793C76)
_LG = (_f64(0x3FE5555555555593), _f64(0x3FD999999997FA04), _f64(0x3FD2492494229359), _f64(0x3FCC71C51D8E78AF),
       _f64(0x3FC7466496CB03DE), _f64(0x3FC39A09D078C69F), _f64(0x3FC2F112DF3E5244))


def f64_constants() -> list:
    """Every float64 constant the kernel uses (the sm_90 compile test finds each one's bits in the PTX)."""
    return [*_A, *_B[1:], *_C, *_D[1:], _SPLIT1, _CONST1, _CONST2, _LN2_HI, _LN2_LO, *_LG]


# ----------------------------------------------------------------------------- reference

def _horner(r: torch.Tensor, coef) -> torch.Tensor:
    acc = torch.full_like(r, coef[-1])
    for c in reversed(coef[:-1]):
        acc = acc * r + c
    return acc


def ndtri_f64(u: torch.Tensor) -> torch.Tensor:
    """Phi^-1 of float64 u in [2^-33, 1 - 2^-33] (AS241 without its far-tail branch), op for op as the kernel."""
    q = u - 0.5
    r1 = _CONST1 - q * q
    z = q * _horner(r1, _A) / _horner(r1, _B)
    tail = q.abs() > _SPLIT1              # ~15 % of the elements: the tail branch only where it is used
    if tail.any():                        # (elementwise ops: the same bits as evaluating it everywhere)
        ut, qt = u[tail], q[tail]
        r = torch.where(qt < 0, ut, 1.0 - ut)
        r = torch.sqrt(-_log_f64(r)) - _CONST2
        z2 = _horner(r, _C) / _horner(r, _D)
        z[tail] = torch.where(qt < 0, -z2, z2)
    return z


def keyed_normal_ref(seeds: torch.Tensor, sample_ids: torch.Tensor, n: int, device=None) -> torch.Tensor:
    """Plain PyTorch (exact on CPU: IEEE float64 ops only): (B, n) float32, row by row."""
    device = torch.device(device) if device is not None else seeds.device
    seeds = seeds.to(torch.int64).reshape(-1).cpu()
    ids = sample_ids.to(torch.int64).reshape(-1).cpu()
    out = torch.empty(len(seeds), n, dtype=torch.float32)
    g = np.arange((n + 3) // 4, dtype=np.uint64)
    for b, (s, i) in enumerate(zip(seeds.tolist(), ids.tolist())):
        # two's complement 32-bit words of the int64 seed and id, as the kernel splits them
        words = philox_np(g, NOISE_STREAM, i & _MASK32, (i >> 32) & _MASK32, s & _MASK32, (s >> 32) & _MASK32)
        x = torch.from_numpy(np.stack(words, 1).reshape(-1)[:n].astype(np.float64))
        u = (x + 0.5) * (2.0 ** -32)
        out[b] = ndtri_f64(u).to(torch.float32)
    return out.to(device)


def philox_np(c0: np.ndarray, c1: int, c2: int, c3: int, k0: int, k1: int):
    """Philox4x32-10 (Random123's key schedule; the token sampler's `philox4x32_10`) on a uint64 array of
    counter words c0 < 2^32 and scalar words c1..c3, key (k0, k1): four uint64 arrays of uint32 words. A product
    of two words is < 2^64, so uint64 arithmetic is exact (10x faster than the int64 split of the token sampler)."""
    c0 = c0.astype(np.uint64)
    c1, c2, c3 = (np.full_like(c0, v) for v in (c1, c2, c3))
    m = np.uint64(_MASK32)
    for r in range(10):
        if r:
            k0 = (k0 + 0x9E3779B9) & _MASK32
            k1 = (k1 + 0xBB67AE85) & _MASK32
        p0 = c0 * np.uint64(0xD2511F53)
        p1 = c2 * np.uint64(0xCD9E8D57)
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ np.uint64(k0), p1 & m,
                          (p0 >> np.uint64(32)) ^ c3 ^ np.uint64(k1), p0 & m)
    return c0, c1, c2, c3


# ----------------------------------------------------------------------------- kernel

def _c64(v):
    """A float64 constant (a bare Python float in a kernel is typed float32 when it fits one: rounded)."""
    return tl.full([], v, tl.float64)


def _log64(x):
    """fdlibm log of positive normal float64 x, op for op as `_log_f64`."""
    bits = x.to(tl.int64, bitcast=True)
    hx = bits >> 32
    k = (hx >> 20) - 1023
    hx = hx & 0x000FFFFF
    i = (hx + 0x95F64) & 0x100000
    k = k + (i >> 20)
    f = (((hx | (i ^ 0x3FF00000)) << 32) | (bits & 0xFFFFFFFF)).to(tl.float64, bitcast=True) - _c64(1.0)
    s = f / (f + _c64(2.0))                 # float64 / and sqrt lower to div.rn / sqrt.rn (IEEE)
    dk = k.to(tl.float64)
    z = s * s
    w = z * z
    t1 = w * (_c64(LG1) + w * (_c64(LG3) + w * _c64(LG5)))
    t2 = z * (_c64(LG0) + w * (_c64(LG2) + w * (_c64(LG4) + w * _c64(LG6))))
    R = t2 + t1
    hfsq = (_c64(0.5) * f) * f
    return dk * _c64(LN2_HI) - ((hfsq - (s * (hfsq + R) + dk * _c64(LN2_LO))) - f)


def _poly7(r, c0, c1, c2, c3, c4, c5, c6, c7):
    """Horner, highest degree first, as `_horner`."""
    acc = tl.zeros(r.shape, tl.float64) + _c64(c7)
    acc = acc * r + _c64(c6)
    acc = acc * r + _c64(c5)
    acc = acc * r + _c64(c4)
    acc = acc * r + _c64(c3)
    acc = acc * r + _c64(c2)
    acc = acc * r + _c64(c1)
    return acc * r + _c64(c0)


def _ndtri64(x):
    """uint32 word -> float64 Phi^-1((x + 0.5) 2^-32), op for op as `ndtri_f64`."""
    u = (x.to(tl.float64) + _c64(0.5)) * _c64(2.0 ** -32)
    q = u - _c64(0.5)
    r1 = _c64(CONST1) - q * q
    z1 = q * _poly7(r1, A0, A1, A2, A3, A4, A5, A6, A7) / _poly7(r1, 1.0, B1, B2, B3, B4, B5, B6, B7)
    r = tl.where(q < 0, u, _c64(1.0) - u)
    r = tl.sqrt(-_log64(r)) - _c64(CONST2)
    z2 = _poly7(r, C0, C1, C2, C3, C4, C5, C6, C7) / _poly7(r, 1.0, D1, D2, D3, D4, D5, D6, D7)
    z2 = tl.where(q < 0, -z2, z2)
    return tl.where(tl.abs(q) <= _c64(SPLIT1), z1, z2)


def _noise_kernel(seed_ptr, sid_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Row b = program_id(1), Philox groups [pid0 * BLOCK, ...): 4 elements per group, stored interleaved."""
    b = tl.program_id(1).to(tl.int64)
    grp = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    s = tl.load(seed_ptr + b)
    sid = tl.load(sid_ptr + b)
    k0 = (s & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((s >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = grp.to(tl.uint32)
    c1 = tl.zeros([BLOCK], tl.uint32) + 0xFFFFFFFF
    c2 = tl.zeros([BLOCK], tl.uint32) + (sid & 0xFFFFFFFF).to(tl.uint32)
    c3 = tl.zeros([BLOCK], tl.uint32) + ((sid >> 32) & 0xFFFFFFFF).to(tl.uint32)
    for r in tl.static_range(10):          # Philox4x32-10, Random123's key schedule
        if r > 0:
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    # (BLOCK, 2, 2) with [g, i, j] = word 2i + j: flattened, element 4g + 2i + j is word 2i + j of group g
    z = tl.join(tl.join(_ndtri64(c0), _ndtri64(c2)), tl.join(_ndtri64(c1), _ndtri64(c3)))
    z = tl.reshape(z, (4 * BLOCK,)).to(tl.float32)
    e = tl.program_id(0).to(tl.int64) * (4 * BLOCK) + tl.arange(0, 4 * BLOCK)
    tl.store(out_ptr + b * n + e, z, mask=e < n)


# Module-level names the jitted helpers read as compile-time constants (fp64 via _c64).
(A0, A1, A2, A3, A4, A5, A6, A7) = _A
(B1, B2, B3, B4, B5, B6, B7) = _B[1:]
(C0, C1, C2, C3, C4, C5, C6, C7) = _C
(D1, D2, D3, D4, D5, D6, D7) = _D[1:]
SPLIT1, CONST1, CONST2 = _SPLIT1, _CONST1, _CONST2
LN2_HI, LN2_LO = _LN2_HI, _LN2_LO
(LG0, LG1, LG2, LG3, LG4, LG5, LG6) = _LG

if triton is not None:
    for _n in [k for k, v in globals().items() if isinstance(v, float) and k.isupper() and not k.startswith("_")]:
        globals()[_n] = tl.constexpr(globals()[_n])
    _c64 = triton.jit(_c64)
    _log64 = triton.jit(_log64)
    _poly7 = triton.jit(_poly7)
    _ndtri64 = triton.jit(_ndtri64)


@functools.lru_cache(maxsize=None)
def _kernel(interpret: bool):
    """The jitted kernel; built per TRITON_INTERPRET mode (triton.jit reads it at decoration)."""
    return triton.jit(_noise_kernel)


_BLOCK = 256            # Philox groups per program: 1024 elements


def keyed_normal_triton(seeds: torch.Tensor, sample_ids: torch.Tensor, n: int, device) -> torch.Tensor:
    """Launch the kernel on `device` (CUDA, or CPU under TRITON_INTERPRET=1)."""
    seeds = seeds.to(device=device, dtype=torch.int64).reshape(-1).contiguous()
    ids = sample_ids.to(device=device, dtype=torch.int64).reshape(-1).contiguous()
    B = seeds.shape[0]
    out = torch.empty(B, n, dtype=torch.float32, device=device)
    if B and n:
        groups = (n + 3) // 4
        with interpreted_stdlib(sys.modules[__name__]):
            _kernel(interpreting())[(triton.cdiv(groups, _BLOCK), B)](
                seeds, ids, out, n, BLOCK=_BLOCK, num_warps=4, enable_fp_fusion=False)   # no FMA: exact bits
    return out


# ----------------------------------------------------------------------------- public

def keyed_normal(seeds: torch.Tensor, sample_ids: torch.Tensor, n: int, device=None) -> torch.Tensor:
    """(B, n) float32 standard normal noise keyed by (seed, sample id, element): see the module docstring."""
    seeds, sample_ids = torch.as_tensor(seeds), torch.as_tensor(sample_ids)
    if seeds.is_floating_point() or sample_ids.is_floating_point():
        raise TypeError("keyed_normal: seeds and sample ids must be integer tensors")
    if seeds.numel() != sample_ids.numel():
        raise ValueError(f"keyed_normal: {seeds.numel()} seeds but {sample_ids.numel()} sample ids")
    n = int(n)
    if not 0 <= n <= MAX_ELEMENTS:
        raise ValueError(f"keyed_normal: {n} elements per sample; at most 2^34")
    device = torch.device(device) if device is not None else seeds.device
    probe = torch.empty(0, device=device)
    if use_kernel("noise", probe):
        return keyed_normal_triton(seeds, sample_ids, n, device)
    return keyed_normal_ref(seeds, sample_ids, n, device)
