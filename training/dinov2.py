"""Frozen DINOv2 encoder for REPA alignment, in plain PyTorch.

The module tree mirrors the official ``DinoVisionTransformer`` as torch hub builds it (``block_chunks=0``),
so a hub state dict (``dinov2_vitb14_pretrain.pth``, or a ``*_reg4_*`` one with register tokens) loads key
for key: ``cls_token``, ``pos_embed`` (1, 1 + 37*37, D), ``mask_token``, ``register_tokens`` (optional),
``patch_embed.proj``, ``blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}``,
``norm``. Position embeddings are resized to the input grid the way DINOv2 does (bicubic, no antialias,
``scale_factor = (n + 0.1) / 37``, which is not the same as ``size = n``).

REPA target features: ``patch_features(images in [-1, 1])`` maps to [0, 1], normalises with the ImageNet
mean/std, resizes bicubically to 224 (REPA's ``preprocess_raw_image`` at 256: ``224 * (256 // 256)``) and
returns the final-norm patch tokens, (B, 16*16, D). REPA's projection loss is ``losses.cosine_repa_loss``.

    enc = load_dinov2("~/.cache/torch/hub/checkpoints")     # or the .pth itself
    with torch.no_grad():
        target = enc.patch_features(images)                 # (B, 256, 768)
    loss = cosine_repa_loss(projector(h), target)
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dar_fast.errors import UsageError

__all__ = ["ARCHS", "DINOv2", "load_dinov2", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The hub models: patch 14, trained at 518 (37 x 37 patches), MLP ratio 4, LayerScale, LayerNorm eps 1e-6.
# (ViT-g/14 uses a SwiGLU FFN and is not built here.)
ARCHS = {
    "vits14": dict(embed_dim=384, depth=12, num_heads=6),
    "vitb14": dict(embed_dim=768, depth=12, num_heads=12),
    "vitl14": dict(embed_dim=1024, depth=24, num_heads=16),
}


# ====================================================================================== layers

class PatchEmbed(nn.Module):
    """(B, 3, H, W) -> (B, H/p * W/p, D) by a stride-p convolution."""

    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)                # (B, N, D)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (biases on)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])     # (B, h, N, C/h), scale 1/sqrt(C/h)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale on both residual branches."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


# ====================================================================================== model

class DINOv2(nn.Module):
    """DINOv2 ViT (official hub key layout). Built frozen: eval mode, no parameter gradients."""

    def __init__(self, embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 patch_size: int = 14, img_size: int = 518, num_register_tokens: int = 0,
                 interpolate_offset: float = 0.1):
        super().__init__()
        self.embed_dim, self.patch_size = embed_dim, patch_size
        self.num_register_tokens, self.interpolate_offset = num_register_tokens, interpolate_offset
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        self.register_tokens = (nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
                                if num_register_tokens else None)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))       # unused here; kept for the key layout
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        """Frozen: stays in eval mode whatever a parent module asks."""
        return super().train(False)

    def interpolate_pos_encoding(self, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
        """pos_embed for an h x w pixel input -> (1, 1 + (h/p)*(w/p), D), as DINOv2 computes it."""
        N = self.pos_embed.shape[1] - 1
        h0, w0 = h // self.patch_size, w // self.patch_size
        if h0 * w0 == N and h == w:
            return self.pos_embed.to(dtype)
        M = int(math.sqrt(N))
        pos = self.pos_embed.float()
        patch = pos[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2)                     # (1, D, M, M)
        patch = F.interpolate(patch, mode="bicubic", antialias=False,
                              scale_factor=((h0 + self.interpolate_offset) / M, (w0 + self.interpolate_offset) / M))
        assert patch.shape[-2:] == (h0, w0), patch.shape
        patch = patch.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)
        return torch.cat([pos[:, :1], patch], dim=1).to(dtype)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (B, 3, H, W), H and W multiples of 14 -> final-norm tokens
        (B, 1 + registers + H/14 * W/14, D)."""
        B, _, H, W = x.shape
        if H % self.patch_size or W % self.patch_size:
            raise UsageError(f"input {H}x{W} is not a multiple of the patch size {self.patch_size}")
        t = self.patch_embed(x)                                                           # (B, N, D)
        t = torch.cat([self.cls_token.expand(B, -1, -1).to(t.dtype), t], dim=1)          # (B, 1+N, D)
        t = t + self.interpolate_pos_encoding(H, W, t.dtype)
        if self.register_tokens is not None:
            t = torch.cat([t[:, :1], self.register_tokens.expand(B, -1, -1).to(t.dtype), t[:, 1:]], dim=1)
        for blk in self.blocks:
            t = blk(t)
        return self.norm(t)

    @torch.no_grad()
    def patch_features(self, images: torch.Tensor, resolution: int = 224) -> torch.Tensor:
        """REPA targets: images (B, 3, H, W) in [-1, 1] -> patch tokens (B, (resolution/14)^2, D) after the final
        norm; (B, 256, 768) for ViT-B/14 at the default 224."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise UsageError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        dtype = self.pos_embed.dtype
        x = (images.float() + 1) / 2
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        x = F.interpolate(x, size=(resolution, resolution), mode="bicubic")               # as REPA: after norm
        return self.forward_features(x.to(dtype))[:, 1 + self.num_register_tokens:]


# ====================================================================================== loading

def _find_checkpoint(path: str, arch: str) -> str:
    """A .pth path, or a directory (a torch hub dir: it or its checkpoints/ holding dinov2_<arch>*.pth)."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"DINOv2 weights not found: {path} (give the dinov2_{arch}_pretrain.pth file or "
                                f"the torch hub directory holding it)")
    for d in (path, os.path.join(path, "checkpoints")):
        if not os.path.isdir(d):
            continue
        names = sorted(os.listdir(d))
        for want in (f"dinov2_{arch}_pretrain.pth", f"dinov2_{arch}_reg4_pretrain.pth"):
            if want in names:
                return os.path.join(d, want)
        cands = [n for n in names if n.startswith(f"dinov2_{arch}") and n.endswith((".pth", ".pt"))]
        if len(cands) == 1:
            return os.path.join(d, cands[0])
        if len(cands) > 1:
            raise UsageError(f"several DINOv2 {arch} checkpoints in {d}: {cands}; pass the file")
    raise FileNotFoundError(f"no dinov2_{arch}*.pth in {path} or {os.path.join(path, 'checkpoints')}")


def load_dinov2(path_or_dir: str, arch: str = "vitb14", device="cpu", dtype: Optional[torch.dtype] = None,
                **overrides) -> DINOv2:
    """A frozen DINOv2 from a local hub state dict (file, or a hub directory holding it). Register tokens are
    detected from the checkpoint. Every key must be consumed and every shape must match: a mismatch is an
    error naming the keys. ``overrides`` change the ARCHS entry (embed_dim, depth, num_heads, img_size...)."""
    if arch not in ARCHS:
        raise UsageError(f"unknown DINOv2 arch {arch!r}; choose one of {', '.join(ARCHS)}")
    ckpt = _find_checkpoint(os.path.expanduser(os.fspath(path_or_dir)), arch)
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    cfg = {**ARCHS[arch], **overrides}
    if "register_tokens" in sd:
        cfg.setdefault("num_register_tokens", sd["register_tokens"].shape[1])
    if "pos_embed" in sd and "img_size" not in cfg:
        grid = int(math.isqrt(sd["pos_embed"].shape[1] - 1))
        cfg["img_size"] = grid * cfg.get("patch_size", 14)
    with torch.device("meta"):                       # no throw-away initialisation of ~86M parameters
        model = DINOv2(**cfg)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad_shape = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or bad_shape:
        raise UsageError(f"{ckpt} does not match DINOv2 {arch} ({cfg}): missing {missing[:8]}, unexpected "
                         f"{unexpected[:8]}, shape mismatches {bad_shape[:8]}")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(device=device, dtype=dtype or torch.float32).requires_grad_(False)
