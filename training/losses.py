"""Training objectives: the tokenizer's (paper eq. 7, as released) and the AR model's.

Each objective is an nn.Module that owns the model being trained (as ``.model``) and returns a dict of scalar
loss terms with the weighted total under "loss". The distribution wrappers (DDP / FSDP2) wrap the objective,
so its forward is the one call per micro-batch they see. Frozen networks (LPIPS, DINOv2) are held outside the
module tree: they are neither trained, synchronised nor sharded, and never land in a checkpoint.

Tokenizer, per image (B images, N tokens in K groups of G, data_std s, time shift):

    z      = l2norm(encode_latents(image))                     (B, N, d) pre-quantisation, normalised
    q      = nearest l2-normalised code of each z               (B, N, d)
    u ~ U(0,1), g = training_group(u, K) = round(u*K) clamped,  t = time_shift(u)
    VQ     = mean over the tokens of groups 0..g (the ones the step's condition depends on, causally):
             |q - sg(z)|^2 + 0.25 |sg(q) - z|^2   (per-token mean over d)
    cond   = cond_from_vectors(z + sg(q - z))                   straight-through, all N tokens, causal layers
    c_g    = tokens g*G .. g*G+G-1 of cond                     one gather for the batch
    x1 = s*image, x0 ~ N(0,I), x_t = t*x1 + (1-t)*x0,  v = x1 - x0
    FM     = |net(x_t, t, c_g) - v|^2 / s^2
    LPIPS  = lpips(image, (x_t + (1-t) v_pred) / s)            one-step estimate of the image
    REPA   = 1 - cos(repa_head(block repa_layer tokens pooled to 16x16), DINOv2 patch features)
    loss   = FM + VQ + w_lpips * LPIPS + w_repa * REPA          (w = 0.5, 0.5 in the paper)

AR: cross-entropy of the N image tokens given the class token and the tokens before each; the class is
replaced by the null class with probability 0.1 by the trainer (classifier-free guidance).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dar_fast import ops
from dar_fast.errors import UsageError
from dar_fast.models.diffusion import time_shift, training_group

COMMIT_BETA = 0.25


# ====================================================================================== pieces

def quantize_st(z: torch.Tensor, codebook: torch.Tensor):
    """z (B,N,d) raw latents, codebook (n,d) -> (zn, q, idx): normalised latents (fp32), their nearest normalised
    codes (fp32, differentiable w.r.t. the codebook) and the indices (B,N) int64 (exactly what tok.encode returns)."""
    B, N, d = z.shape
    zn = F.normalize(z.float(), dim=-1)
    emb = F.normalize(codebook.float(), dim=-1)
    with torch.no_grad():
        idx = ops.vq_nearest(zn.detach().reshape(-1, d), codebook.detach()).view(B, N)
    q = F.embedding(idx, emb)
    return zn, q, idx


def vq_losses(zn: torch.Tensor, q: torch.Tensor, mask: torch.Tensor, beta: float = COMMIT_BETA):
    """Codebook and commitment losses over the tokens in ``mask`` (B,N) bool: mean over d, then over the masked
    tokens of the batch."""
    m = mask.float()
    denom = m.sum().clamp_min(1.0)
    codebook = (((q - zn.detach()) ** 2).mean(-1) * m).sum() / denom
    commit = beta * (((q.detach() - zn) ** 2).mean(-1) * m).sum() / denom
    return codebook, commit


def causal_group_mask(g: torch.Tensor, num_tokens: int, group_size: int) -> torch.Tensor:
    """(B,) groups -> (B,N) bool: token j is used by step g when j < (g+1)*G."""
    j = torch.arange(num_tokens, device=g.device)
    return j[None, :] < ((g + 1) * group_size)[:, None]


def gather_group(cond: torch.Tensor, g: torch.Tensor, group_size: int) -> torch.Tensor:
    """cond (B,N,D), groups (B,) -> (B,G,D): each sample's own group, one gather."""
    B, N, Dm = cond.shape
    idx = g[:, None] * group_size + torch.arange(group_size, device=cond.device)[None]     # (B,G)
    return cond.gather(1, idx[..., None].expand(B, group_size, Dm))


def pool_tokens(x: torch.Tensor, count: int) -> torch.Tensor:
    """(B, s*s, C) square grid of tokens -> (B, count, C) average-pooled to sqrt(count) x sqrt(count) (identity
    when the counts agree: DINOv2-B/14 at 224 px gives the 16 x 16 the REPA head predicts)."""
    B, T, C = x.shape
    if T == count:
        return x
    s, g = int(round(T ** 0.5)), int(round(count ** 0.5))
    if s * s != T or g * g != count:
        raise UsageError(f"REPA: cannot pool {T} target tokens to {count} (not square grids)")
    grid = x.transpose(1, 2).reshape(B, C, s, s)
    return F.adaptive_avg_pool2d(grid.float(), g).flatten(2).transpose(1, 2).to(x.dtype)


def cosine_repa_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """REPA's projection loss: 1 - cosine similarity per token, averaged over tokens and samples; pred, target
    (B,T,C). REPA writes -cos: the same gradient, shifted by 1 (we log the non-negative one). The target is
    detached: gradients reach ``pred`` only."""
    if pred.shape != target.shape:
        raise UsageError(f"REPA loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    return (1.0 - F.cosine_similarity(pred.float(), target.detach().float(), dim=-1)).mean()


# ====================================================================================== tokenizer

class TokenizerObjective(nn.Module):
    def __init__(self, tok: nn.Module, lpips: Optional[nn.Module] = None, lpips_weight: float = 0.0,
                 dino=None, repa_weight: float = 0.0, commit_beta: float = COMMIT_BETA):
        super().__init__()
        self.model = tok
        if not tok.cfg.vq_enable:
            from dar_fast.errors import UsageError
            raise UsageError("tokenizer config: vq_enable: false (the released continuous bottleneck) cannot be trained "
                             "here: this trainer learns a VQ codebook (it loads and reconstructs with one)")
        if lpips_weight > 0 and lpips is None:
            raise UsageError("lpips_weight > 0 needs an LPIPS network")
        if repa_weight > 0 and dino is None:
            raise UsageError("repa_weight > 0 needs a DINOv2 encoder")
        if repa_weight > 0 and tok.net.repa_out is None:
            raise UsageError("repa_weight > 0 but this tokenizer config has no REPA head (repa_head=False or "
                             "diff_decoder.repa_layer >= depth)")
        # frozen networks: plain attributes, outside the module tree (no DDP sync, no sharding, no checkpoint)
        self.__dict__["lpips"] = lpips
        self.__dict__["dino"] = dino
        self.lpips_weight, self.repa_weight, self.commit_beta = float(lpips_weight), float(repa_weight), commit_beta

    def forward(self, images: torch.Tensor, x0: torch.Tensor, u: torch.Tensor) -> Dict[str, torch.Tensor]:
        """images (B,3,H,W) in [-1,1]; x0 (B,3,H,W) noise; u (B,) uniforms in [0,1) -> loss terms."""
        tok = self.model
        cfg = tok.cfg
        dd = cfg.diff_decoder
        std, G, K, N = dd.data_std, cfg.queries_per_step, cfg.num_query_groups, cfg.num_all_queries
        images = images.float()
        z = tok.encode_latents(images)                                          # (B,N,d)
        with torch.autocast(images.device.type, enabled=False):
            zn, q, idx = quantize_st(z, tok.quantize.embedding.weight)
            g = training_group(u, K)                                            # (B,)
            codebook, commit = vq_losses(zn, q, causal_group_mask(g, N, G), self.commit_beta)
            zst = zn + (q - zn).detach()                                        # straight-through
        cond = tok.cond_from_vectors(zst)                                       # (B,N,Dd)
        c_g = gather_group(cond, g, G)                                          # (B,G,Dd)
        t = time_shift(u.float(), dd.time_shift)                                # (B,)
        te = t[:, None, None, None]
        x1 = images * std
        xt = te * x1 + (1 - te) * x0
        v = x1 - x0
        want_repa = self.repa_weight > 0
        out = tok.net(xt, t, c_g, return_repa=want_repa)
        v_pred, h_repa = out if want_repa else (out, None)
        fm = F.mse_loss(v_pred.float(), v) / std ** 2
        terms = {"loss_fm": fm, "loss_codebook": codebook, "loss_commit": commit}
        loss = fm + codebook + commit
        if self.lpips_weight > 0:
            x1_hat = (xt + (1 - te) * v_pred.float()) / std
            lp = self.lpips(images, x1_hat).float().mean()
            terms["loss_lpips"] = lp
            loss = loss + self.lpips_weight * lp
        if want_repa:
            with torch.no_grad():
                target = pool_tokens(self.dino.patch_features(images), h_repa.shape[1])
            rp = cosine_repa_loss(h_repa, target)
            terms["loss_repa"] = rp
            loss = loss + self.repa_weight * rp
        terms["loss"] = loss
        # fraction of the codebook hit by this batch (no host sync: a tensor)
        terms["codebook_usage"] = (torch.bincount(idx.flatten(), minlength=cfg.vq_codebook_size) > 0).float().mean()
        return terms


# ====================================================================================== AR

class ARObjective(nn.Module):
    """Teacher-forced next-token cross-entropy: ARModel.forward's logits of [class; tokens[:-1]] against tokens."""

    def __init__(self, ar: nn.Module):
        super().__init__()
        self.model = ar

    def forward(self, codes: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """codes (B,N) int64, labels (B,) int64 (null class = num_classes) -> {"loss"}. The codes were checked
        once when the code set was opened (CodeSet.check), so the model's per-call checks are off."""
        logits = self.model(codes[:, :-1], labels, check=False)                # (B,N,V) float32
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1))
        return {"loss": loss}
