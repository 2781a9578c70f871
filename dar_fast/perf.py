"""The performance model of dar-fast: every byte and FLOP of sampling (and training FLOPs), one device table.

Everything that reports a fraction of the hardware uses this module: the benchmarks
(`benchmarks/_common.py` builds its ceilings from DEVICES), training MFU
(`training/distributed.peak_flops`, `training/*_train.py` FLOP counts) and the README's floors.

Counting rules (2 FLOP per multiply-add; bytes are HBM traffic of an implementation that reads each
weight once per call and each activation once per kernel, i.e. with this project's fused kernels):
  AR decode step (rows = images x 2 with classifier-free guidance):
    weights   every matmul weight and norm weight once per step, shared by all rows; the token and
              class embedding tables are looked up (rows x dim x bytes), not read;
    KV cache  per row, 2 (K, V) x n_layer x n_kv_head x head_dim x bytes per position: read for the
              positions attended (the used prefix with `kernels/decode_attention.py`, or all N + 1 static
              slots with a masked SDPA), and the new position written;
    FLOPs     2 x matmul params x rows, plus attention 4 x n_head x head_dim x positions x rows x layers;
    activations  the per-layer element moves of the fused Llama block (see `_ar_act_moves`), logits
              written in bf16 and read by the sampler.
  Tokenizer, per group of G new tokens: the causal decoder layers (GatedBlock: 12 D^2 matmul params,
    K/V cached) on the G tokens, and one pixel-DiT call per denoising step (`dit_call_flops`), whose
    activations (B, T, C) are counted per kernel (`_dit_act_moves`), plus the flow step (fp32).
Floors: each stage is split into op classes (weight-streaming matmuls, attention, element-wise); a class
takes at least max(FLOPs / matrix rate, bytes / HBM bandwidth) and the classes of a stage run one after
another on one stream, so the stage floor is the sum (`roofline_ms`). `bound_ms` = max(total FLOPs / rate,
total bytes / bandwidth) is the absolute bound if everything overlapped. Rates are the measured ceilings of
the table where present (H100/H200: 790 TFLOP/s bf16, 3.0 / 4.3 TB/s), else the spec sheet.

Corrected FID-50K floor for D-AR-XL on one H200 (tokenizer_v1, bf16, CFG, batch 256 images = 512 rows, KV
prefix only), as `fid_floor()` computes it from the configs (python -c "from dar_fast import perf; perf.report()"),
at the measured ceilings 790 TFLOP/s and 4.3 TB/s:
  AR (per image). Matmul params 752.4 M: per layer qkv 3 x 1280^2 + wo 1280^2 + SwiGLU 3 x 1280 x 3584 =
    20.3 M, x 36 layers, + head 1280 x 16384 = 21.0 M; weights 1.505 GB per step, shared by 256 images over
    256 steps -> 1.505 GB per image, + activations 512 row-tokens x 36 layers x 49,664 element moves x 2 B =
    1.83 GB (3.37 GB). FLOPs 2 x 752.4 M x 512 = 0.770 TFLOP. Matmul class: max(0.770e12 / 790e12 = 0.975 ms,
    3.37 GB / 4.3 TB/s = 0.78 ms) = 0.975 ms. KV: 2 x 36 x 1280 x 2 B = 184,320 B per position and row;
    token j attends to j + 1 positions, sum over j < 256 = 32,896, x 2 rows, + 512 positions written:
    12.22 GB -> 2.84 ms (the masked SDPA over all 257 slots: 24.35 GB, 5.66 ms). AR: 3.82 ms per image.
  Tokenizer (per image, 8 steps). Decoder layers (8 x 768 over 256 tokens): 0.03 TFLOP, 0.04 ms. DiT:
    332 GFLOP per call (12 blocks of 1024 pixel tokens x 768; attention 4 T^2 D = 3.2 GFLOP per block):
    GEMMs 2.34 TFLOP -> 2.96 ms, attention 0.32 TFLOP -> 0.40 ms, element-wise 29 (T, C) passes per block
    x 12 blocks x 8 calls x 1024 x 768 x 2 B = 4.38 GB -> 1.02 ms; flow steps 0.03 GB. Tokenizer: 4.43 ms.
  Image: 8.24 ms -> FID-50K >= 50,000 x 8.24 ms = 6.9 minutes on one H200 at 100 % of every ceiling with one
  stream of kernels (the absolute bound, every byte and FLOP overlapped: 5.83 ms, 4.9 minutes). Reading the
  whole static KV cache: 11.06 ms, 9.2 minutes. An earlier count of "~5.4 minutes" counted the DiT by FLOPs only and
  the AR without its matmul time; the earlier "3.6 minutes" counted FLOPs only. A target of < 10
  minutes on one H200 takes >= 69 % of this floor's speed. (The tests check these figures against the arithmetic.)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from dar_fast.config import ARConfig, DiffDecoderConfig, TokenizerConfig

# ----------------------------------------------------------------------------- devices (the one table)


@dataclass(frozen=True)
class Device:
    """Ceilings of one accelerator: spec sheet, and what was measured on this workplace's machines."""
    name: str
    bf16_tflops: float                     # dense bf16 tensor-core spec, TFLOP/s
    hbm_gbs: Optional[float] = None        # HBM bandwidth spec, GB/s (1e9 B/s)
    fp32_tflops: Optional[float] = None    # non-tensor-core fp32 (FMA = 2 FLOP)
    hbm_gbs_measured: Optional[float] = None       # device-to-device copy, read + written
    bf16_tflops_measured: Optional[float] = None   # 8192^3 bf16 matmul

    @property
    def bw(self) -> Optional[float]:
        """Bytes/s the floors use: measured when known, else spec."""
        v = self.hbm_gbs_measured or self.hbm_gbs
        return None if v is None else v * 1e9

    @property
    def flops(self) -> float:
        """bf16 FLOP/s the floors use: measured when known, else spec."""
        return (self.bf16_tflops_measured or self.bf16_tflops) * 1e12


# Matched as substrings of torch.cuda.get_device_name(), first match wins (specific names first: "GH200"
# before "H200", "H100 PCIe" before "H100").
DEVICES: list = [
    ("H100 PCIe", Device("H100 PCIe", 756.0, 2000.0, 51.0)),
    ("H100 NVL", Device("H100 NVL", 835.0, 3900.0, 60.0)),
    ("GH200", Device("GH200", 989.0)),
    ("H100", Device("H100 SXM5 80GB", 989.0, 3350.0, 67.0, 3000.0, 790.0)),
    ("H200", Device("H200", 989.0, 4800.0, 67.0, 4300.0, 790.0)),
    ("H800", Device("H800", 989.0)),
    ("B200", Device("B200", 2250.0)),
    ("A100-SXM4-80GB", Device("A100-SXM4-80GB", 312.0, 2039.0, 19.5)),
    ("A100", Device("A100 40GB", 312.0, 1555.0, 19.5)),
    ("A800", Device("A800", 312.0)),
    ("L40S", Device("L40S", 362.0)),
    ("A10G", Device("A10G", 125.0)),
    ("L4", Device("L4", 121.0)),
    ("RTX 4090", Device("RTX 4090", 165.0)),
    ("V100", Device("V100", 125.0)),
]


def device(name: str) -> Optional[Device]:
    """The table entry whose pattern is a substring of `name` (first wins), or None."""
    for pat, d in DEVICES:
        if pat in name:
            return d
    return None


def gpu_ceilings() -> list:
    """[(pattern, {mem_bw_gbs, bf16_tflops, ...})] for the devices with a known bandwidth (benchmarks)."""
    out = []
    for pat, d in DEVICES:
        if d.hbm_gbs is None:
            continue
        c = dict(mem_bw_gbs=d.hbm_gbs, bf16_tflops=d.bf16_tflops)
        if d.fp32_tflops:
            c["fp32_tflops"] = d.fp32_tflops
        if d.hbm_gbs_measured:
            c["mem_bw_gbs_measured"] = d.hbm_gbs_measured
        if d.bf16_tflops_measured:
            c["bf16_tflops_measured"] = d.bf16_tflops_measured
        out.append((pat, c))
    return out


def peak_bf16_flops(name: str) -> Optional[float]:
    """Dense bf16 spec peak in FLOP/s for MFU (DAR_FAST_PEAK_TFLOPS overrides), None when unknown."""
    env = os.environ.get("DAR_FAST_PEAK_TFLOPS")
    if env:
        return float(env) * 1e12
    d = device(name)
    return None if d is None else d.bf16_tflops * 1e12


# ----------------------------------------------------------------------------- cost records


@dataclass
class Cost:
    """FLOPs and bytes of one op class, or of a sum of them (kept per class for the roofline)."""
    flops: float = 0.0
    bytes: float = 0.0
    parts: dict = field(default_factory=dict)     # class name -> (flops, bytes)

    def add(self, name: str, flops: float, nbytes: float) -> "Cost":
        f, b = self.parts.get(name, (0.0, 0.0))
        self.parts[name] = (f + flops, b + nbytes)
        self.flops += flops
        self.bytes += nbytes
        return self

    def __iadd__(self, other: "Cost") -> "Cost":
        for k, (f, b) in other.parts.items():
            self.add(k, f, b)
        return self

    def scaled(self, s: float) -> "Cost":
        out = Cost()
        for k, (f, b) in self.parts.items():
            out.add(k, f * s, b * s)
        return out

    def roofline_ms(self, dev: Device) -> float:
        """Sum over op classes of max(FLOPs / rate, bytes / bandwidth), in ms."""
        return sum(max(f / dev.flops, b / dev.bw) for f, b in self.parts.values()) * 1e3

    def bound_ms(self, dev: Device) -> float:
        """max(total FLOPs / rate, total bytes / bandwidth): everything overlapped, in ms."""
        return max(self.flops / dev.flops, self.bytes / dev.bw) * 1e3


# ----------------------------------------------------------------------------- AR model

def ar_matmul_params(cfg: ARConfig) -> int:
    """Parameters that take part in a matmul per token: blocks and the output head (not the embedding tables)."""
    D, hd = cfg.dim, cfg.head_dim
    per_layer = D * (cfg.n_head + 2 * cfg.kv_heads) * hd + cfg.n_head * hd * D + 3 * D * cfg.ffn_hidden
    return cfg.n_layer * per_layer + D * cfg.vocab_size


def ar_params(cfg: ARConfig) -> int:
    """All parameters: matmuls, norms (2 per layer + final), class table (+ null row), token table."""
    D = cfg.dim
    return ar_matmul_params(cfg) + (2 * cfg.n_layer + 1) * D + (cfg.num_classes + 1) * D + cfg.vocab_size * D


def ar_weight_bytes(cfg: ARConfig, bytes_per_param: int = 2) -> int:
    """Bytes every decode step reads whatever the batch: matmul and norm weights (tables are looked up)."""
    return (ar_matmul_params(cfg) + (2 * cfg.n_layer + 1) * cfg.dim) * bytes_per_param


def ar_kv_bytes_per_position(cfg: ARConfig, bytes_per_el: int = 2) -> int:
    """K and V of one cache position of one row, all layers."""
    return 2 * cfg.n_layer * cfg.kv_heads * cfg.head_dim * bytes_per_el


def _ar_act_moves(cfg: ARConfig) -> int:
    """Activation elements read + written per row per layer by the fused block: rms_norm+residual (4D),
    qkv GEMM (D in, (Hq+2Hk)hd out), RoPE on q, k (2x), attention q in / o out, wo GEMM, rms_norm+residual,
    w13 GEMM (D in, 2F out), swiglu (2F in, F out), w2 GEMM (F in, D out)."""
    D, hd, F = cfg.dim, cfg.head_dim, cfg.ffn_hidden
    q, kv = cfg.n_head * hd, cfg.kv_heads * hd
    return (4 * D + (D + q + 2 * kv) + 2 * (q + kv) + 2 * q + (q + D) + 4 * D + (D + 2 * F) + 3 * F + (F + D))


def ar_step_cost(cfg: ARConfig, rows: int, positions: int, kv_read_positions: Optional[int] = None,
                 bytes_per_el: int = 2) -> Cost:
    """One forward of one token for `rows` rows attending to `positions` cache positions.

    kv_read_positions: positions read from the cache (default = positions: the used prefix; the masked
    SDPA over a static cache reads all N + 1 slots)."""
    kv_read = positions if kv_read_positions is None else kv_read_positions
    D, L, V = cfg.dim, cfg.n_layer, cfg.vocab_size
    c = Cost()
    act = rows * (L * _ar_act_moves(cfg) + D + D + 2 * V) * bytes_per_el   # + embedding lookup, final norm, logits
    c.add("ar_matmul", 2.0 * ar_matmul_params(cfg) * rows, ar_weight_bytes(cfg, bytes_per_el) + act)
    kvp = ar_kv_bytes_per_position(cfg, bytes_per_el)
    c.add("ar_kv", 4.0 * L * cfg.n_head * cfg.head_dim * positions * rows, rows * (kv_read + 1) * kvp)
    return c


def ar_image_cost(cfg: ARConfig, batch: int, guided: bool = True, kv: str = "prefix",
                  bytes_per_el: int = 2) -> Cost:
    """All N tokens of `batch` images (prefill of the class token + N - 1 decode steps), per image.

    Token j (0-based) attends to j + 1 positions (class token, tokens 0 .. j-1): sum 1 + 2 + ... + N.
    kv='full': every step reads the whole static cache of N + 1 slots (the masked SDPA path)."""
    if kv not in ("prefix", "full"):
        raise ValueError(f"kv must be 'prefix' or 'full', got {kv!r}")
    rows = batch * (2 if guided else 1)
    N = cfg.block_size
    tot = Cost()
    for j in range(N):
        tot += ar_step_cost(cfg, rows, j + 1, (N + 1) if kv == "full" else None, bytes_per_el)
    return tot.scaled(1.0 / batch)


def ar_flops_per_image(cfg: ARConfig, guided: bool = True) -> float:
    """Forward FLOPs to generate one image's N tokens (both CFG rows), attention included."""
    return ar_image_cost(cfg, 1, guided).flops


def ar_train_flops(cfg: ARConfig, sequences: int, seq_len: Optional[int] = None,
                   grad_checkpointing: bool = False) -> float:
    """PaLM-style count per step: 6 x matmul params x tokens + attention 12 x layers x dim x T per token
    (scores and values, forward + backward, the full T x T square as PaLM counts it). With activation
    checkpointing the blocks' forward runs twice (8 instead of 6)."""
    T = seq_len or cfg.block_size
    mult = 8 if grad_checkpointing else 6
    dense = mult * ar_matmul_params(cfg) * T
    attn = (mult * 2) * cfg.n_layer * cfg.dim * T * T
    return float((dense + attn) * sequences)


# ----------------------------------------------------------------------------- tokenizer

def dit_block_flops(dd: DiffDecoderConfig, T: int, G: int) -> float:
    """One DiT block for one image: T pixel tokens, G condition tokens (2 FLOP per multiply-add)."""
    D = dd.dim
    return (2 * 2 * D * D                   # time embedding MLP (per image)
            + 2 * G * 2 * D * D             # condition MLP
            + 2 * T * 2 * D * D + 2 * G * 2 * D * D + 4 * T * G * D   # cross-attention: q, proj | k, v | scores
            + 2 * T * 6 * D * D             # adaLN modulation (per token)
            + 2 * T * 4 * D * D + 4 * T * T * D                       # self-attention
            + 2 * T * 8 * D * D)            # MLP


def dit_call_flops(cfg: TokenizerConfig, size=None) -> float:
    """One pixel-DiT velocity call for one image: blocks, patchify in / out, condition projection."""
    dd = cfg.diff_decoder
    H, W = size or cfg.image_size
    p, D, G = dd.patch_size, dd.dim, cfg.queries_per_step
    T = (H // p) * (W // p)
    return float(2 * T * 3 * p * p * D * 2 + 2 * G * dd.cond_dim * D + dd.depth * dit_block_flops(dd, T, G))


def tokenizer_step_flops(cfg: TokenizerConfig) -> float:
    """One diffusion-decoder call for one image (~331 GFLOP for tokenizer_v1)."""
    return dit_call_flops(cfg)


def tokenizer_decode_flops(cfg: TokenizerConfig) -> float:
    """All K denoising calls for one image (the decoder layers: `tokenizer_cost`)."""
    return cfg.num_denoising_steps * tokenizer_step_flops(cfg)


def _dit_weight_params(dd: DiffDecoderConfig) -> int:
    """Per block: time MLP 2D^2, condition MLP 2D^2, cross q,k,v,proj 4D^2, self qkv+proj 4D^2, adaLN 6D^2,
    MLP 8D^2 (biases and q/k-norm weights are < 0.1 % and omitted)."""
    return dd.depth * 26 * dd.dim * dd.dim


# Element moves of (T, C) activations per DiT block as implemented with the fused kernels, by op class:
#   GEMMs: cross q (1 in + 1 out), cross proj (1 + 1), adaLN modulation (1 + 6), self qkv (1 + 3), self proj
#          (1 + 1), MLP fc1 (1 + 4), fc2 (4 + 1)                                                    = 27
#   attention I/O: cross (q in, o out: 2; its K/V are the G condition tokens), self (q, k, v in, o out: 4) = 6
#   element-wise: LayerNorm (2), modulate (h, shift, scale in, out: 4), RoPE on q, k (4), gated residual +
#          next modulate (x, gate, y, shift, scale in; h, u out: 7), MLP activation (4 + 4), gated residual (4) = 29
DIT_GEMM_MOVES, DIT_ATTN_MOVES, DIT_ELEM_MOVES = 27, 6, 29


def tokenizer_cost(cfg: TokenizerConfig, batch: int, steps: Optional[int] = None, bytes_per_el: int = 2) -> Cost:
    """Per image: the causal decoder layers over the N tokens (group by group, K/V cached), `steps` DiT
    calls and flow steps, for `batch` images sharing every weight read."""
    K = steps or cfg.num_denoising_steps
    S = cfg.num_query_groups
    N, Dd, Ld = cfg.num_all_queries, cfg.decoder_dim, cfg.num_decoder_layers
    dd = cfg.diff_decoder
    H, W = cfg.image_size
    T = (H // dd.patch_size) * (W // dd.patch_size)
    G = cfg.queries_per_step
    c = Cost()
    # decoder layers: 12 Dd^2 matmul params per layer (qkv, proj 4, MLP 8), causal attention over N tokens;
    # weights read once per group for the batch; ~20 Dd element moves per token per layer; K/V once each
    flops = 2 * N * (cfg.vq_dim * Dd + Ld * 12 * Dd * Dd) + Ld * 4 * Dd * N * (N + 1) // 2
    w = S * Ld * 12 * Dd * Dd * bytes_per_el / batch
    c.add("tok_decoder", float(flops), w + N * Ld * 20 * Dd * bytes_per_el)
    # DiT calls: GEMMs stream their weights once per call for the batch; activations per image
    wb = (_dit_weight_params(dd) + 2 * 3 * dd.patch_size ** 2 * dd.dim) * bytes_per_el / batch
    per_move = T * dd.dim * bytes_per_el * dd.depth                # one (T, C) pass in every block
    attn_flops = dd.depth * (4.0 * T * T * dd.dim + 4.0 * T * G * dd.dim)
    c.add("dit_matmul", K * (dit_call_flops(cfg) - attn_flops), K * (wb + DIT_GEMM_MOVES * per_move))
    c.add("dit_attention", K * attn_flops, K * DIT_ATTN_MOVES * per_move)
    c.add("dit_elementwise", 0.0, K * DIT_ELEM_MOVES * per_move)
    # flow step (fp32 x, v, v_prev read, x written) on 3 x H x W pixels
    c.add("flow_step", 0.0, K * 4 * 3 * H * W * 4)
    return c


def tokenizer_forward_flops(cfg: TokenizerConfig, repa: bool = False) -> dict:
    """Analytic forward FLOPs per image (2 per multiply-add) of the trained parts: encoder, causal decoder
    layers and ONE pixel-DiT call. Matmuls plus attention scores/values over the pairs the masks allow.
    Frozen LPIPS / DINOv2 and element-wise ops are not counted (MFU is therefore a lower bound)."""
    H, W = cfg.image_size
    De, Dd, dd = cfg.encoder_dim, cfg.decoder_dim, cfg.diff_decoder
    pe, N, d = cfg.encoder_patch_size, cfg.num_all_queries, cfg.vq_dim
    P = (H // pe) * (W // pe)
    M = P + N
    pairs_enc = P * P + N * P + N * (N + 1) // 2                 # patches see patches; queries: patches + causal
    enc = 2 * P * 3 * pe * pe * De + cfg.num_encoder_layers * (2 * M * 12 * De * De + 4 * pairs_enc * De)
    enc += 2 * N * De * d
    dec = 2 * N * d * Dd + cfg.num_decoder_layers * (2 * N * 12 * Dd * Dd + 4 * (N * (N + 1) // 2) * Dd)
    Dn, p, G = dd.dim, dd.patch_size, cfg.queries_per_step
    T = (H // p) * (W // p)
    net = dit_call_flops(cfg)
    if repa:
        g2 = dd.repa_grid ** 2
        net += 2 * g2 * (Dn * dd.repa_hidden + dd.repa_hidden ** 2 + dd.repa_hidden * dd.repa_dim)
    return {"encoder": enc, "decoder": dec, "diffusion": net, "dit_blocks": dd.depth * dit_block_flops(dd, T, G)}


def tokenizer_train_flops(cfg: TokenizerConfig, images: int, repa: bool = False,
                          grad_checkpointing: bool = False) -> float:
    """Forward + backward = 3 x forward; activation checkpointing re-runs the DiT blocks' forward once more."""
    f = tokenizer_forward_flops(cfg, repa)
    per = 3 * (f["encoder"] + f["decoder"] + f["diffusion"])
    if grad_checkpointing:
        per += f["dit_blocks"]
    return float(per * images)


# ----------------------------------------------------------------------------- images, floors

def image_flops(tok: TokenizerConfig, ar: ARConfig, guided: bool = True) -> float:
    return ar_flops_per_image(ar, guided) + tokenizer_cost(tok, 1).flops


def image_cost(tok: TokenizerConfig, ar: ARConfig, batch: int, guided: bool = True, kv: str = "prefix") -> dict:
    """{'ar': Cost, 'tokenizer': Cost} per image at this batch."""
    return {"ar": ar_image_cost(ar, batch, guided, kv), "tokenizer": tokenizer_cost(tok, batch)}


def stage_floors(tok: TokenizerConfig, ar: ARConfig, dev: Device, batch: int, guided: bool = True,
                 kv: str = "prefix") -> dict:
    """Per-image floors (ms) of each stage and the image: roofline (serial op classes) and absolute bound."""
    costs = image_cost(tok, ar, batch, guided, kv)
    out = {}
    total = Cost()
    for name, c in costs.items():
        total += c
        out[name] = dict(roofline_ms=c.roofline_ms(dev), bound_ms=c.bound_ms(dev), tflop=c.flops / 1e12,
                         gb=c.bytes / 1e9, parts={k: dict(tflop=f / 1e12, gb=b / 1e9) for k, (f, b) in c.parts.items()})
    out["image"] = dict(roofline_ms=total.roofline_ms(dev), bound_ms=total.bound_ms(dev), tflop=total.flops / 1e12,
                        gb=total.bytes / 1e9)
    return out


def fid_floor(tok: TokenizerConfig, ar: ARConfig, dev: Device, batch: int = 256, images: int = 50_000,
              kv: str = "prefix") -> dict:
    """Minutes for `images` images on one device at this batch: roofline and absolute bound."""
    f = stage_floors(tok, ar, dev, batch, True, kv)["image"]
    return dict(roofline_min=images * f["roofline_ms"] / 6e4, bound_min=images * f["bound_ms"] / 6e4,
                ms_per_image=f["roofline_ms"])


def floors(tok: TokenizerConfig, ar: ARConfig, copy_GBps: float, bf16_tflops: float, guided: bool = True) -> dict:
    """Batch-1 AR floor (weights + KV prefix, ms per image) and the large-batch image rate (images/s) for a
    device given by its bandwidth and bf16 rate (the benchmarks' measured ceilings)."""
    dev = Device("given", bf16_tflops, copy_GBps)
    b1 = ar_image_cost(ar, 1, guided)
    big = stage_floors(tok, ar, dev, 256, guided)["image"]
    return {
        "ar_weight_read_floor_ms": ar.block_size * ar_weight_bytes(ar) / (copy_GBps * 1e9) * 1e3,
        "ar_batch1_floor_ms": b1.roofline_ms(dev),
        "image_tflop": image_flops(tok, ar, guided) / 1e12,
        "flop_floor_images_per_s": bf16_tflops * 1e12 / image_flops(tok, ar, guided),
        "batch256_images_per_s": 1e3 / big["roofline_ms"],
    }


def report(models=("D-AR-L", "D-AR-XL"), devices=("H100", "H200"), batches=(1, 64, 256)) -> None:
    """Print the floors table of the README."""
    from dar_fast.config import AR_PRESETS, TOKENIZER_PRESETS
    tok = TOKENIZER_PRESETS["tokenizer_v1"]().validate()
    for m in models:
        ar = AR_PRESETS[m]().validate()
        for dn in devices:
            dev = device(dn)
            for b in batches:
                for kv in ("prefix", "full"):
                    s = stage_floors(tok, ar, dev, b, True, kv)
                    print(f"{m:8s} {dn} batch {b:3d} kv={kv:6s} AR {s['ar']['roofline_ms']:8.2f} ms  "
                          f"tokenizer {s['tokenizer']['roofline_ms']:6.2f} ms  image {s['image']['roofline_ms']:8.2f} ms"
                          f" (bound {s['image']['bound_ms']:.2f})  FID-50K {50000 * s['image']['roofline_ms'] / 6e4:7.1f} min")
