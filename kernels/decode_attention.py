"""Decode attention: one new query per row over a static KV cache, reading only the used prefix.

    decode_attention(q, k_cache, v_cache, cache_len, scale=None, num_splits=None) -> (B, Hq, D)

q: (B, Hq, D) (the new token's queries; last dim contiguous, any other strides,
e.g. q[:, 0] of a (B, 1, Hq, D) projection view). k_cache, v_cache:
(B, Hk, S_max, D) static buffers, last dim contiguous (the AR model's KVCache
layout). Hq must be a multiple of Hk (GQA: query head h reads kv head
h // (Hq / Hk)). cache_len: integer tensor on q's device, 0-dim (every row) or
(B,) (per row): row b attends to cache positions 0 .. cache_len[b] - 1, which
must already hold the new token's own k / v. Lengths are read on the device,
never by the host, so one captured CUDA graph serves every step; a length
above S_max is clamped to S_max and a length of 0 gives a zero output (the
reference does the same). scale defaults to 1/sqrt(D). The output is q's
dtype. The reference (`decode_attention_ref`) is SDPA over each row's prefix.

How it works (flash-decoding)
-----------------------------
Phase 1, grid (B * Hk, splits): a program takes one (row, kv head) and the
G = Hq / Hk query heads that share it (so each K/V tile is read once per
group, not once per query head), and one of `splits` equal chunks of
[0, S_max). It streams its chunk's tiles of BLOCK_N positions that lie below
the row's length (tiles at or past the length are never loaded; a chunk that
starts past it exits at once), keeping an online softmax (running max m,
sum l, float32 accumulator) with exp2 and the scale folded into log2 units.
The G query heads are padded to 16 rows so that q k^T and p v are tensor-core
dots (the padding is free: the kernel is bound by the K/V bytes, not by FLOPs).
Phase 2 (only when splits > 1), grid (B * Hq): combines the split partials
(m, l, acc) with weights exp2(m_s - max m). With one split phase 1 writes the
normalised output directly. No mask tensor exists anywhere.

Bytes and why it is fast (estimates, by arithmetic)
---------------------------------------------------
K and V of the used prefix are read once: 2 * B * Hk * len * D * bytes. D-AR-L
decode at batch 64 with CFG (B = 128 rows, Hk = 16, D = 64, bf16), step j reads
2 * 128 * 16 * j * 64 * 2 B = 0.52 MB * j per layer; averaged over the 256
steps (mean len ~129) 68 MB per layer per step against 135 MB for the full
257-slot cache that the masked SDPA path reads (plus its (B, 1, 1, 257) mask
and the masked-out products): about half of the AR phase's KV traffic
disappears. Splits: with B * Hk programs below ~2 x 132 SMs (batch 1: 2 rows x
16 heads = 32 programs) the prefix is split so every SM streams; at large
batch one split suffices and phase 2 is skipped.
It stops being fast when
  * D is not a power of two (lanes masked) or the cache is not contiguous in D;
  * B * Hq is tiny and len is short: one launch (~3 us, a typical figure, not timed here) dominates a
    sub-microsecond read; only a CUDA graph over the whole step helps;
  * G > 16 (then G is padded to the next power of two and the dot grows).
Precision: float32 softmax and accumulator; p is rounded to the cache dtype
before the p v dot (as FlashAttention does); float32 inputs use IEEE dots.
"""
from __future__ import annotations

import functools
import math

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

__all__ = ["decode_attention", "decode_attention_ref", "choose_splits"]

_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- reference

def decode_attention_ref(q, k_cache, v_cache, cache_len, scale=None):
    """Plain PyTorch: per row, SDPA of q[b] over the first cache_len[b] positions (GQA by repetition).

    Reads the lengths back to the host (a reference, not for CUDA graphs)."""
    B, Hq, D = q.shape
    Hk, S = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hk
    lens = torch.as_tensor(cache_len).reshape(-1).expand(B).clamp(0, S).tolist()
    out = torch.zeros(B, Hq, D, dtype=q.dtype, device=q.device)
    for b, n in enumerate(lens):
        if n == 0:
            continue
        k = k_cache[b, :, :n].repeat_interleave(G, dim=0)            # (Hq, n, D)
        v = v_cache[b, :, :n].repeat_interleave(G, dim=0)
        out[b] = F.scaled_dot_product_attention(q[b, :, None], k, v, scale=scale)[:, 0]
    return out


# ----------------------------------------------------------------------------- kernels

def _split_kernel(q_ptr, k_ptr, v_ptr, len_ptr, o_ptr, m_ptr, l_ptr, acc_ptr,
                  Hk, S_max, chunk, n_splits, qk_scale,
                  sqb, sqh, skb, skh, sks, svb, svh, svs, sob, soh, slen,
                  G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_N: tl.constexpr, SINGLE: tl.constexpr, F32_DOT: tl.constexpr):
    """(row b, kv head hk) = divmod(pid0, Hk), chunk pid1: online softmax over positions [start, min(end, len))."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // Hk).to(tl.int64)
    hk = (pid % Hk).to(tl.int64)
    n_len = tl.minimum(tl.load(len_ptr + b * slen).to(tl.int32), S_max)
    start = split * chunk
    end = tl.minimum(start + chunk, n_len)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, BLOCK_D)
    gm = g < G
    dm = d < D
    hq = hk * G + g                                                    # query heads of this kv head
    q = tl.load(q_ptr + b * sqb + hq[:, None] * sqh + d[None, :], mask=gm[:, None] & dm[None, :], other=0.0)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    kb = k_ptr + b * skb + hk * skh
    vb = v_ptr + b * svb + hk * svh
    for n0 in range(start, end, BLOCK_N):                              # only tiles below the length
        n = n0 + tl.arange(0, BLOCK_N)
        nm = n < end
        ld = nm[:, None] & dm[None, :]
        k = tl.load(kb + n[:, None].to(tl.int64) * sks + d[None, :], mask=ld, other=0.0)
        if F32_DOT:       # float32 caches; the interpreter (its bf16/fp16 tl.dot returns garbage, triton 3.x)
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(nm[None, :], s * qk_scale, float("-inf"))       # log2 units
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(vb + n[:, None].to(tl.int64) * svs + d[None, :], mask=ld, other=0.0)
        if F32_DOT:
            pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    if SINGLE:
        o = tl.div_rn(acc, tl.where(l_i > 0, l_i, 1.0)[:, None])     # IEEE division; empty rows -> 0
        tl.store(o_ptr + b * sob + hq[:, None] * soh + d[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=gm[:, None] & dm[None, :])
    else:
        Hq = Hk * G
        part = (b * Hq + hq) * n_splits + split                        # (G_PAD,)
        tl.store(m_ptr + part, m_i, mask=gm)
        tl.store(l_ptr + part, l_i, mask=gm)
        tl.store(acc_ptr + part[:, None] * BLOCK_D + d[None, :], acc, mask=gm[:, None])


def _combine_kernel(o_ptr, m_ptr, l_ptr, acc_ptr, Hq, n_splits, sob, soh,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS_PAD: tl.constexpr):
    """Query head (b, h) = divmod(pid, Hq): o = sum_s w_s acc_s / sum_s w_s l_s, w_s = exp2(m_s - max m)."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // Hq
    h = pid % Hq
    s = tl.arange(0, SPLITS_PAD)
    sm = s < n_splits
    d = tl.arange(0, BLOCK_D)
    m = tl.load(m_ptr + pid * n_splits + s, mask=sm, other=float("-inf"))
    l = tl.load(l_ptr + pid * n_splits + s, mask=sm, other=0.0)
    mx = tl.max(m, axis=0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)                        # every split empty: weights 0
    w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - mx))
    acc = tl.load(acc_ptr + (pid * n_splits + s)[:, None] * BLOCK_D + d[None, :], mask=sm[:, None], other=0.0)
    num = tl.sum(w[:, None] * acc, axis=0)
    den = tl.sum(w * l, axis=0)
    o = tl.div_rn(num, tl.where(den > 0, den, 1.0))
    tl.store(o_ptr + b * sob + h * soh + d, o.to(o_ptr.dtype.element_ty), mask=d < D)


@functools.lru_cache(maxsize=None)
def _kernels(interpret: bool):
    """The jitted kernels; built per TRITON_INTERPRET mode (triton.jit reads it at decoration)."""
    return triton.jit(_split_kernel), triton.jit(_combine_kernel)


_BLOCK_N = 64
_TARGET_PROGRAMS = 264          # ~2 programs per SM on an H100/H200 (132 SMs)


def choose_splits(B: int, Hk: int, S_max: int, block_n: int = _BLOCK_N) -> int:
    """KV-length splits so that B * Hk * splits reaches ~2 programs per SM; 1 at large batch (no combine)."""
    want = -(-_TARGET_PROGRAMS // max(1, B * Hk))
    return max(1, min(want, -(-S_max // block_n)))


# ----------------------------------------------------------------------------- host launcher

def decode_attention_triton(q, k_cache, v_cache, cache_len, scale=None, num_splits=None):
    """Launch (inputs already checked; cache_len an integer tensor on q's device, 0-dim or (B,))."""
    B, Hq, D = q.shape
    Hk, S_max = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hk
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    if B == 0 or Hq == 0:
        return out
    splits = num_splits or choose_splits(B, Hk, S_max)
    splits = max(1, min(int(splits), -(-S_max // _BLOCK_N)))
    chunk = -(-(-(-S_max // splits)) // _BLOCK_N) * _BLOCK_N            # ceil(S_max / splits) up to BLOCK_N
    splits = -(-S_max // chunk)
    block_d = max(16, triton.next_power_of_2(D))
    g_pad = max(16, triton.next_power_of_2(G))
    scale = (1.0 / math.sqrt(D)) if scale is None else float(scale)
    lens = cache_len.reshape(-1)
    slen = 0 if lens.numel() == 1 else lens.stride(0)
    single = splits == 1
    if single:
        m = l = acc = out
    else:
        m = torch.empty(B * Hq * splits, dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
        acc = torch.empty(B * Hq * splits, block_d, dtype=torch.float32, device=q.device)
    split_k, combine = _kernels(interpreting())
    with interpreted_stdlib(), on_device(q):
        split_k[(B * Hk, splits)](
            q, k_cache, v_cache, lens, out, m, l, acc, Hk, S_max, chunk, splits, scale * _LOG2E,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), slen,
            G=G, G_PAD=g_pad, D=D, BLOCK_D=block_d, BLOCK_N=_BLOCK_N, SINGLE=single,
            F32_DOT=q.dtype == torch.float32 or interpreting(), num_warps=4)
        if not single:
            combine[(B * Hq,)](out, m, l, acc, Hq, splits, out.stride(0), out.stride(1),
                               D=D, BLOCK_D=block_d, SPLITS_PAD=triton.next_power_of_2(splits), num_warps=4)
    return out


# ----------------------------------------------------------------------------- public

def decode_attention(q, k_cache, v_cache, cache_len, scale=None, num_splits=None):
    """`dar_fast.ops.decode_attention`. See the module docstring."""
    if q.dim() != 3:
        raise ValueError(f"decode_attention: q must be (B, Hq, D), got shape {tuple(q.shape)}")
    B, Hq, D = q.shape
    if k_cache.dim() != 4 or k_cache.shape[0] != B or k_cache.shape[3] != D or v_cache.shape != k_cache.shape:
        raise ValueError(f"decode_attention: k_cache and v_cache must both be (B={B}, Hk, S_max, D={D}), got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    Hk = k_cache.shape[1]
    if Hk == 0 or Hq % Hk:
        raise ValueError(f"decode_attention: n_head {Hq} is not a multiple of n_kv_head {Hk}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"decode_attention: q, k_cache, v_cache dtypes differ ({q.dtype}, {k_cache.dtype}, "
                         f"{v_cache.dtype})")
    if not torch.is_tensor(cache_len):
        cache_len = torch.tensor(int(cache_len), dtype=torch.int32, device=q.device)
    if cache_len.is_floating_point() or cache_len.is_complex() or cache_len.numel() not in (1, B) \
            or cache_len.dim() > 1:
        raise ValueError(f"decode_attention: cache_len must be an integer 0-dim or ({B},) tensor, got "
                         f"{cache_len.dtype} {tuple(cache_len.shape)}")
    if cache_len.device != q.device or k_cache.device != q.device or v_cache.device != q.device:
        raise ValueError("decode_attention: q, the caches and cache_len must be on one device")
    if not use_kernel("decode_attention", q, k_cache, v_cache):
        return decode_attention_ref(q, k_cache, v_cache, cache_len, scale)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("decode_attention: the caches' last dim must be contiguous")
    return decode_attention_triton(q, k_cache, v_cache, cache_len, scale, num_splits)
