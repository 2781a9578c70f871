"""Pixel-space diffusion transformer: the tokenizer's decoder, with its flow schedule and solvers."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dar_fast import ops
from dar_fast.config import DiffDecoderConfig
from dar_fast.models.layers import Attention, Mlp, layer_norm, rope_table


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) -> (B, dim) sinusoidal embedding of t*1000, [cos | sin] halves."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.dim).to(self.mlp[0].weight.dtype))


class DiTBlock(nn.Module):
    """adaLN block whose modulation comes from cross-attention to the condition tokens plus time.

    The cross-attention output only drives the modulation (6 x dim per token);
    it is never added to x.
    """

    def __init__(self, dim: int, head_dim: int = 64, rope_base: float = 10000.0, own_time_embed: bool = True):
        super().__init__()
        # share_time_encoding (released): one embedder in the net, none per block
        self.time_embed = TimestepEmbedder(dim) if own_time_embed else None
        self.cond_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.cross_attn = Attention(dim, head_dim, rope_base)
        self.attention = Attention(dim, head_dim, rope_base)
        self.mlp = Mlp(dim, 4 * dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, t, cond, pos):
        # x (B,T,D) pixel tokens; t (B,) shifted time, or (B,D) its shared embedding; cond (B,G,D); pos (T,2)
        temb = self.time_embed(t) if self.time_embed is not None else t   # (B,D)
        c = layer_norm(self.cond_embed(cond))                             # (B,G,D)
        h = layer_norm(x)
        ca = self.cross_attn(h, context=c, pos=pos)                       # (B,T,D), RoPE on queries only
        mod = self.adaLN_modulation(ca + temb[:, None])                   # (B,T,6D)
        sa, ca_, ga, sm, cm, gm = mod.chunk(6, dim=-1)
        if x.is_cuda and not torch.compiler.is_compiling():
            # eager CUDA: modulate, gated residual + the next LayerNorm-modulate, gated residual as 3 kernels
            # (kernels/adaln.py; the same roundings as the lines below, which the compiler fuses by itself)
            x, u = ops.gated_residual(x, ga, self.attention(ops.adaln_modulate(h, sa, ca_, normalize=False), pos=pos),
                                      sm, cm)
            return ops.gated_residual(x, gm, self.mlp(u))
        x = x + ga * self.attention(h * (1 + ca_) + sa, pos=pos)
        return x + gm * self.mlp(layer_norm(x) * (1 + cm) + sm)


class FinalLayer(nn.Module):
    """Released `mlp_head` output: LN (no affine) modulated by the shared time embedding, then Linear."""

    def __init__(self, dim: int, out: int):
        super().__init__()
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, temb):
        # x (B,T,D) tokens; temb (B,D) time embedding
        shift, scale = self.adaLN_modulation(temb)[:, None].chunk(2, dim=-1)
        return self.linear(layer_norm(x) * (1 + scale) + shift)


class DiffusionNet(nn.Module):
    """Velocity network v(x_t, t, cond group) on pixels, patchified by rearrangement."""

    def __init__(self, cfg: DiffDecoderConfig, head_dim: int = 64, repa_head: bool = True):
        super().__init__()
        self.cfg = cfg
        p, D = cfg.patch_size, cfg.dim
        self.conv_in = nn.Conv2d(cfg.in_dim * p * p, D, 1)
        self.cond_mlp = nn.Linear(cfg.cond_dim, D)
        share = cfg.share_time_encoding
        self.time_embed = TimestepEmbedder(D) if share else None
        self.blocks = nn.ModuleList([DiTBlock(D, head_dim, cfg.rope_base_len, own_time_embed=not share)
                                     for _ in range(cfg.depth)])
        if cfg.mlp_head:      # released FinalLayer: time-modulated LayerNorm, then Linear (validate() needs share)
            self.linear_out = FinalLayer(D, cfg.out_dim * p * p)
            self.conv_out = None
        else:
            self.conv_out = nn.Conv2d(D, cfg.out_dim * p * p, 1)
            self.linear_out = None
        self.repa_out = (nn.Sequential(nn.Linear(D, cfg.repa_hidden), nn.SiLU(), nn.Linear(cfg.repa_hidden, cfg.repa_hidden),
                                       nn.SiLU(), nn.Linear(cfg.repa_hidden, cfg.repa_dim))
                         if repa_head and cfg.repa_layer < cfg.depth else None)
        self._pos_cache = {}

    def grid_pos(self, h, w, device):
        key = (h, w, str(device))
        if key not in self._pos_cache:
            self._pos_cache[key] = ops.grid_positions(h, w, device=device)
        return self._pos_cache[key]

    def grid_rope(self, h, w, device):
        """What the blocks rotate with: on CPU and under torch.compile the (cos, sin) table of the grid, built
        once (the compiler fuses the rotation; on CPU it saves the ~10 ops of recomputing the angles per
        call); in eager CUDA the positions, for the one-launch Triton RoPE kernel."""
        pos = self.grid_pos(h, w, device)
        if torch.device(device).type == "cuda" and not torch.compiler.is_compiling():
            return pos
        key = ("table", h, w, str(device))
        if key not in self._pos_cache:
            head_dim, base = self.blocks[0].attention.head_dim, self.blocks[0].attention.rope_base
            self._pos_cache[key] = rope_table(pos, head_dim, base)
        return self._pos_cache[key]

    def forward(self, x, t, cond, return_repa: bool = False):
        # x (B,C,H,W) noisy pixels; t (B,) shifted time; cond (B,G,cond_dim)
        B, C, H, W = x.shape
        p = self.cfg.patch_size
        h, w = H // p, W // p
        # b c (h p1) (w p2) -> b (h w) (c p1 p2), then the 1x1 conv as a linear: the residual stream is a
        # contiguous (B,hw,D) (a conv output transposed to tokens would make every block's adds strided)
        x = x.view(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * p * p)
        x = F.linear(x, self.conv_in.weight.flatten(1), self.conv_in.bias)   # (B,hw,D)
        cond = layer_norm(self.cond_mlp(cond))                            # (B,G,D)
        if self.time_embed is not None:
            t = self.time_embed(t)                                        # (B,D), shared by every block
        pos = self.grid_rope(h, w, x.device)
        repa = None
        for i, blk in enumerate(self.blocks):
            if return_repa and i == self.cfg.repa_layer and self.repa_out is not None:
                repa = self.repa_features(x, h, w)
            x = blk(x, t, cond, pos)
        x = layer_norm(x)
        if self.linear_out is not None:
            x = self.linear_out(x, t)                                     # (B, hw, C*p*p)
        else:
            x = F.linear(x, self.conv_out.weight.flatten(1), self.conv_out.bias)
        Co = self.cfg.out_dim
        # b (h w) (c p1 p2) -> b c (h p1) (w p2)
        v = x.view(B, h, w, Co, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, Co, H, W)
        return (v, repa) if return_repa else v

    def repa_features(self, x, h, w):
        """(B,hw,D) tokens -> average-pooled to the REPA grid -> MLP -> (B, g*g, repa_dim)."""
        g = self.cfg.repa_grid
        B, T, D = x.shape
        grid = x.transpose(1, 2).reshape(B, D, h, w)
        if (h, w) != (g, g):
            grid = F.adaptive_avg_pool2d(grid, (g, g))
        return self.repa_out(grid.flatten(2).transpose(1, 2))


# ----------------------------------------------------------------------------------------------
# Flow schedule and solvers
# ----------------------------------------------------------------------------------------------

def time_shift(u, shift: float):
    """s(u) = u / (u + shift * (1 - u))."""
    return u / (u + shift * (1 - u))


def sampling_times(num_steps: int, shift: float) -> list:
    """[t_0 .. t_S]: t_i = s(i/S), t_S = s(1) = 1.

    Exactly as released: u_i = i/S as Python (float64) numbers, then one float32
    tensor, then the shift in float32 (a float32 division i/S could differ by an ulp)."""
    u = torch.tensor([i / num_steps for i in range(num_steps)] + [1.0], dtype=torch.float32)
    return time_shift(u, shift).tolist()


def step_groups(num_steps: int, num_groups: int) -> list:
    """Token group read by each of S diffusion steps: g_i = min(floor(i*K/S + 1/2), K-1), exact integers.

    S < K skips groups (K=8, S=4: 0,2,4,6); S > K reads some twice (K=4, S=8: 0,1,1,2,2,3,3,3).
    floor(i*K/S + 1/2) == (2iK + S) // (2S). The released code computes it in float64 and can
    land one group lower where i*K/S + 1/2 is an integer (K=11, S=22, i=15: 7 instead of 8);
    `step_query_starts` reproduces what it then reads. A step never needs a later group than
    this one, so a streaming engine that waits for group g_i is always safe."""
    S, K = int(num_steps), int(num_groups)
    return [min((2 * i * K + S) // (2 * S), K - 1) for i in range(S)]


def step_query_starts(num_steps: int, num_groups: int, num_queries: int, group_size: int) -> list:
    """First condition token read by each step, computed as the released decoder does (float64).

    start_i = min(N - G, int(floor(i/S*K + 0.5) / K * N)). With N = K*G this is g_i*G except
    where float rounding lowers it (K=10, G=9, group 7: 62, not 63; K=11, 15 likewise; never for
    K <= 9 or K a power of two); the released code then reads the G tokens from there."""
    S, K, N, G = int(num_steps), int(num_groups), int(num_queries), int(group_size)
    return [min(N - G, int(math.floor(i / S * K + 0.5) / K * N)) for i in range(S)]


def training_group(u: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Condition group used at training time u: round(u*K) half up, clamped to the last group."""
    return torch.floor(u * num_groups + 0.5).long().clamp(max=num_groups - 1)
