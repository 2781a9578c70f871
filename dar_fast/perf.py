"""The performance model of DESIGN.md, as code: FLOPs and bytes per image, and the floors they imply.

Counts are analytic (2 FLOP per multiply-add), so the benchmarks can report the
fraction of the hardware limit they reach.
"""
from __future__ import annotations

from dar_fast.config import ARConfig, TokenizerConfig


def ar_params(cfg: ARConfig) -> int:
    D, L, V, hd = cfg.dim, cfg.n_layer, cfg.vocab_size, cfg.head_dim
    qkv = D * (cfg.n_head + 2 * cfg.kv_heads) * hd
    per_layer = qkv + D * D + 3 * D * cfg.ffn_hidden + 2 * D
    return L * per_layer + (cfg.num_classes + 1) * D + V * D + D + V * D


def ar_matmul_params(cfg: ARConfig) -> int:
    """Weights touched by every decode step (embedding tables are gathered, not multiplied)."""
    return ar_params(cfg) - (cfg.num_classes + 1) * cfg.dim - cfg.vocab_size * cfg.dim


def ar_flops_per_image(cfg: ARConfig, guided: bool = True) -> float:
    """Forward FLOPs to generate one image's N tokens (cond + null rows when guided), attention included."""
    N, D, L = cfg.block_size, cfg.dim, cfg.n_layer
    rows = 2 if guided else 1
    dense = 2 * ar_matmul_params(cfg) * N
    # attention: token j attends to j+1 keys: sum_j 2 * 2 * D * (j+1) ~ 2 * D * N^2 per layer
    attn = L * 2 * D * N * (N + 1)
    return rows * (dense + attn)


def ar_weight_bytes(cfg: ARConfig, bytes_per_param: int = 2) -> int:
    """Bytes every decode step must read (batch 1 is bound by this)."""
    return ar_matmul_params(cfg) * bytes_per_param


def tokenizer_step_flops(cfg: TokenizerConfig) -> float:
    """One diffusion-decoder call for one image: ~330 GFLOP for tokenizer_v1 (DESIGN.md)."""
    dd = cfg.diff_decoder
    H, W = cfg.image_size
    T = (H // dd.patch_size) * (W // dd.patch_size)
    D, G = dd.dim, cfg.queries_per_step
    per_block = (
        T * (4 * D * D)            # self-attention q, k, v, proj
        + 2 * T * T * D            # self-attention scores and values
        + T * (2 * D * D)          # cross-attention q and proj on pixel tokens
        + G * (4 * D * D)          # cond_embed (2 layers) and cross k, v on the group tokens
        + 2 * T * G * D            # cross-attention scores and values
        + T * (6 * D * D)          # adaLN modulation, per token
        + T * (8 * D * D)          # MLP D -> 4D -> D
    )
    io = T * (3 * dd.patch_size ** 2) * D * 2
    return 2.0 * (dd.depth * per_block + io)


def tokenizer_decode_flops(cfg: TokenizerConfig) -> float:
    """All K steps for one image (the encoder-side decoder layers are negligible: N tokens only)."""
    return cfg.num_denoising_steps * tokenizer_step_flops(cfg)


def image_flops(tok: TokenizerConfig, ar: ARConfig, guided: bool = True) -> float:
    return ar_flops_per_image(ar, guided) + tokenizer_decode_flops(tok)


def floors(tok: TokenizerConfig, ar: ARConfig, copy_GBps: float, bf16_tflops: float, guided: bool = True) -> dict:
    """Batch-1 weight-read floor (ms per image) and large-batch FLOP floor (images/s)."""
    weight_read_ms = ar.block_size * ar_weight_bytes(ar) / (copy_GBps * 1e9) * 1e3
    flops = image_flops(tok, ar, guided)
    return {
        "ar_weight_read_floor_ms": weight_read_ms,
        "image_tflop": flops / 1e12,
        "flop_floor_images_per_s": bf16_tflops * 1e12 / flops,
    }
