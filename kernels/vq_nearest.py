"""Nearest l2-normalised codebook entry (the released VQ lookup).

vq_nearest(z (M,d), codebook (n,d)) -> (M,) int64: the row of the codebook with
the highest cosine similarity to each z row (both l2-normalised as
F.normalize(x.float(), dim=-1) does, eps 1e-12), ties to the lowest index.

Where the kernel is fast, and why it stops being fast
-----------------------------------------------------
The reference materialises the (M x n) similarity matrix in fp32 and reads it
back for the argmax: at the tokenizer's n = 16384, d = 8 that is 64 KiB of
traffic per token for 32 FLOP of useful work per similarity, so it runs at
memory speed (M = 16384 tokens: 1 GiB written and read again). The kernel keeps
each (BLOCK_M x BLOCK_N) tile of similarities in registers and folds it into a
running per-slot (value, tile) arg-max, so it reads z once and the normalised
codebook (n*d*4 = 512 KiB, L2-resident) once per block of rows and writes M
int64s. It is then bound by instruction issue on the CUDA cores: d FMAs plus
one compare and two selects per similarity is the floor (~11 at d = 8); the
compiled tile loop takes ~16 per similarity (SASS, sm_90), ~4.3 G instructions
at M = n = 16384, on the order of 0.13 ms on an H100 (~33 T lane-instr/s)
against ~0.7 ms of memory traffic alone for the reference (estimates: 16 x 16384^2
= 4.3e9 instructions / 3.3e13 per s = 0.13 ms; 2 x 1 GiB / 3 TB/s = 0.7 ms; bench_vq_nearest.py times both).
  * d < 16: outer-product accumulation over d with exactly d FMAs (a tl.dot
    would pad K to 16 and do twice the work: 23.5 instructions / similarity);
  * d >= 16: tl.dot in IEEE fp32 (FMA lowering; no TF32, which would change the
    arg-max near ties), with register blocking done by the compiler.
  * the codebook is padded with NaN columns to whole tiles (a NaN similarity
    never wins the strict compare), so the tile loop has no masks.
It stops being fast when
  * M is small (one image: M = 256 -> 4 row blocks): the codebook is split
    across programs (SPLIT, ~8 programs per SM) so every SM has work, and a
    second tiny kernel reduces the SPLIT partial arg-maxes; at that size the
    two launches dominate;
  * d is large (> 64 is not tuned: the per-tile work and registers grow with
    d and tensor cores would be the right tool). For d > 256 the public
    function falls back to the reference.
Precision: everything in fp32 like the reference, but the order of the d
products differs from the BLAS the reference calls, so results are identical
except at near-ties (top-2 similarity gap ~1e-7, a few ulps), where either
answer is as right as the other. NaN inputs give an unspecified index.
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

MAX_TRITON_DIM = 256      # beyond this the public function uses the reference


# ----------------------------------------------------------------------------- reference

def vq_nearest_ref(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(M,d), (n,d) -> (M,) int64: argmax cosine similarity, ties to the lowest index."""
    zn = F.normalize(z.float(), dim=-1)
    cn = F.normalize(codebook.float(), dim=-1)
    return (zn @ cn.t()).argmax(dim=-1)


def _check_inputs(z: torch.Tensor, codebook: torch.Tensor) -> None:
    if not isinstance(z, torch.Tensor) or not isinstance(codebook, torch.Tensor):
        raise TypeError("vq_nearest: z and codebook must be tensors")
    if z.dim() != 2:
        raise ValueError(f"vq_nearest: z must be 2-D (M, d), got shape {tuple(z.shape)}")
    if codebook.dim() != 2:
        raise ValueError(f"vq_nearest: codebook must be 2-D (n, d), got shape {tuple(codebook.shape)}")
    if z.shape[1] != codebook.shape[1]:
        raise ValueError(f"vq_nearest: z has d={z.shape[1]} but the codebook rows have d={codebook.shape[1]}")
    if codebook.shape[0] == 0 or codebook.shape[1] == 0:
        raise ValueError(f"vq_nearest: empty codebook of shape {tuple(codebook.shape)}")
    if not z.is_floating_point() or not codebook.is_floating_point():
        raise TypeError(f"vq_nearest: expected floating-point inputs, got {z.dtype} and {codebook.dtype}")
    if z.device != codebook.device:
        raise ValueError(f"vq_nearest: z is on {z.device} but the codebook on {codebook.device}")


# ----------------------------------------------------------------------------- kernels

def _vq_nearest_kernel(z_ptr, cbt_ptr, idx_ptr, pval_ptr, pidx_ptr,
                       M, NP, stride_zm, stride_zd, tiles_per_split,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       USE_DOT: tl.constexpr, PARTIAL: tl.constexpr):
    """One (BLOCK_M rows) x (codebook split) program: normalise z, similarities, running arg-max.

    cbt is the normalised codebook transposed and padded, (BLOCK_D, NP)
    contiguous with NP a multiple of BLOCK_N: rows >= d are 0 and columns >= n
    are NaN. A NaN similarity never passes `s > best`, so the tile loop needs
    no masks (and its loads vectorise).
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    m_ok = rm < M
    # F.normalize: x / max(||x||_2, eps), in fp32
    z = tl.load(z_ptr + rm[:, None] * stride_zm + rd[None, :] * stride_zd,
                mask=m_ok[:, None] & (rd[None, :] < D), other=0.0).to(tl.float32)
    nrm = tl.maximum(tl.sqrt_rn(tl.sum(z * z, axis=1)), 1e-12)     # IEEE sqrt / div (plain ones may be approximate)
    zn = tl.div_rn(z, nrm[:, None])                                 # (BLOCK_M, BLOCK_D)

    best_val = tl.full((BLOCK_M, BLOCK_N), float("-inf"), tl.float32)
    best_tile = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
    cols = tl.arange(0, BLOCK_N)
    tile_lo = pid_s * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, NP // BLOCK_N)
    for tile in range(tile_lo, tile_hi):
        rn = tile * BLOCK_N + cols
        if USE_DOT:
            c = tl.load(cbt_ptr + rd[:, None] * NP + rn[None, :])
            s = tl.dot(zn, c, input_precision="ieee")
        else:
            # outer products over k; the columns of zn are loop-invariant (hoisted out of the tile loop)
            z0 = tl.sum(tl.where(rd[None, :] == 0, zn, 0.0), axis=1)
            s = z0[:, None] * tl.load(cbt_ptr + rn)[None, :]
            for k in tl.static_range(1, D):
                zk = tl.sum(tl.where(rd[None, :] == k, zn, 0.0), axis=1)
                s += zk[:, None] * tl.load(cbt_ptr + k * NP + rn)[None, :]
        upd = s > best_val                           # strict: the earlier tile keeps a tie; NaN never wins
        best_val = tl.where(upd, s, best_val)
        best_tile = tl.where(upd, tile, best_tile)

    # fold the BLOCK_N slots: highest value, then the lowest global index among equals
    row_max = tl.max(best_val, axis=1)
    gidx = best_tile * BLOCK_N + cols[None, :]
    cand = tl.where(best_val == row_max[:, None], gidx, 2147483647)
    row_idx = tl.min(cand, axis=1)
    if PARTIAL:
        tl.store(pval_ptr + pid_s * M + rm, row_max, mask=m_ok)
        tl.store(pidx_ptr + pid_s * M + rm, row_idx, mask=m_ok)
    else:
        tl.store(idx_ptr + rm, row_idx.to(tl.int64), mask=m_ok)


def _vq_reduce_splits_kernel(pval_ptr, pidx_ptr, idx_ptr, M, SPLIT, BLOCK_M: tl.constexpr):
    """Arg-max over the SPLIT partial results (split s covers lower indices than s+1)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    best_val = tl.load(pval_ptr + rm, mask=m_ok, other=0.0)
    best_idx = tl.load(pidx_ptr + rm, mask=m_ok, other=0)
    for s in range(1, SPLIT):
        v = tl.load(pval_ptr + s * M + rm, mask=m_ok, other=0.0)
        i = tl.load(pidx_ptr + s * M + rm, mask=m_ok, other=0)
        upd = v > best_val
        best_val = tl.where(upd, v, best_val)
        best_idx = tl.where(upd, i, best_idx)
    tl.store(idx_ptr + rm, best_idx.to(tl.int64), mask=m_ok)


@functools.lru_cache(maxsize=None)
def _kernels(interpret: bool):
    """The jitted kernels; built per TRITON_INTERPRET mode (triton.jit reads it at decoration)."""
    return triton.jit(_vq_nearest_kernel), triton.jit(_vq_reduce_splits_kernel)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# ----------------------------------------------------------------------------- host launcher

def vq_nearest_triton(z: torch.Tensor, codebook: torch.Tensor, *, split: int | None = None,
                      use_dot: bool | None = None) -> torch.Tensor:
    """Launch the Triton kernel (inputs already checked). `split`/`use_dot` override the heuristics (tests).

    Tile shapes were chosen by compiling for sm_90 offline and counting SASS
    instructions per similarity in the tile loop (ideal ~11 at d = 8: 8 FFMA,
    compare, 2 selects), not by timing (no GPU was available):
      outer product 64x32, 2 warps: 15.8 / sim, 148 registers (64x64, 4 warps: 17.8; 32x64: 16.9)
      tl.dot (K padded to 16) 64x64, 4 warps: 23.5 / sim
    """
    M, d = z.shape
    n = codebook.shape[0]
    out = torch.empty(M, dtype=torch.int64, device=z.device)
    if M == 0:
        return out
    if use_dot is None:
        use_dot = d >= 16
    block_m, block_n, warps = (64, 64, 4) if use_dot else (64, 32, 2)
    block_d = max(16 if use_dot else 1, triton.next_power_of_2(d))
    m_blocks = triton.cdiv(M, block_m)
    n_tiles = triton.cdiv(n, block_n)
    np_ = n_tiles * block_n
    # n*d*4 bytes: normalising it once per call is cheaper than once per program. Padded (see the kernel):
    # rows d..block_d-1 are 0, columns n..np_-1 NaN.
    cbt = torch.zeros((block_d, np_), dtype=torch.float32, device=z.device)
    cbt[:, n:] = float("nan")
    cbt[:d, :n] = F.normalize(codebook.float(), dim=-1).t()
    if split is None:
        sms = _num_sms(z.device.index if z.device.index is not None else torch.cuda.current_device()) \
            if z.is_cuda else 1
        # ~8 programs per SM (a program holds ~150 registers x 64 threads, so several fit), splitting the
        # codebook when there are too few row blocks; the partial arg-maxes cost 8 bytes per row and split
        split = triton.cdiv(8 * sms, m_blocks)
    split = max(1, min(int(split), n_tiles))
    tiles_per_split = triton.cdiv(n_tiles, split)
    split = triton.cdiv(n_tiles, tiles_per_split)                          # no empty split
    main, reduce = _kernels(interpreting())
    if split == 1:
        pval = pidx = out                                                  # unused
    else:
        pval = torch.empty((split, M), dtype=torch.float32, device=z.device)
        pidx = torch.empty((split, M), dtype=torch.int32, device=z.device)
    with interpreted_stdlib(), on_device(z):
        main[(m_blocks, split)](z, cbt, out, pval, pidx, M, np_, z.stride(0), z.stride(1), tiles_per_split,
                                D=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
                                USE_DOT=bool(use_dot), PARTIAL=split > 1, num_warps=warps)
        if split > 1:
            reduce[(triton.cdiv(M, 256),)](pval, pidx, out, M, split, BLOCK_M=256, num_warps=4)
    return out


# ----------------------------------------------------------------------------- public

def vq_nearest(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(M,d) any float dtype, (n,d) -> (M,) int64 index of the highest cosine (`dar_fast.ops.vq_nearest`)."""
    _check_inputs(z, codebook)
    if z.shape[1] <= MAX_TRITON_DIM and use_kernel("vq_nearest", z, codebook):
        return vq_nearest_triton(z, codebook)
    return vq_nearest_ref(z, codebook)
