"""The reference sampler: plain eager PyTorch, obviously right, the baseline the fast engine must equal.

Class-conditional AR generation with the KV cache over a [cond; null] batch,
CFG with a constant scale or a linear (start, end) schedule, temperature,
top-k, top-p, keyed draws (`ops.sample_tokens`), then the K-step decode.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

from dar_fast import ops
from dar_fast.kernels.flow_step import images_to_uint8_ref
from dar_fast.models import ARModel, Tokenizer
from dar_fast.seeding import resolve_keys, sample_noise

CFG = Union[float, Tuple[float, float], Sequence[float]]


@dataclass
class SampleOutput:
    images: torch.Tensor           # (B,H,W,3) uint8
    tokens: torch.Tensor           # (B,N) int64
    noise: Optional[torch.Tensor] = None   # (B,3,H,W) initial pixel noise
    float_images: Optional[torch.Tensor] = None  # (B,3,H,W) decoder output before uint8


def cfg_schedule(cfg: CFG, num_tokens: int) -> Optional[torch.Tensor]:
    """(N,) float32 guidance scale per token position, or None for no guidance (constant 1.0).

    A float is constant; (start, end) is linspace(start, end, N)[j] for token j.
    """
    if isinstance(cfg, (int, float)) or (torch.is_tensor(cfg) and cfg.dim() == 0):
        s = float(cfg)
        if s < 0:
            raise ValueError(f"cfg scale must be >= 0, got {s}")
        return None if s == 1.0 else torch.full((num_tokens,), s, dtype=torch.float32)
    vals = [float(v) for v in cfg]
    if len(vals) != 2:
        raise ValueError(f"cfg must be a float or a (start, end) pair, got {cfg!r}")
    if min(vals) < 0:
        raise ValueError(f"cfg scales must be >= 0, got {vals}")
    return torch.linspace(vals[0], vals[1], num_tokens, dtype=torch.float32)


def check_compatible(tok: Tokenizer, ar: ARModel):
    if ar.vocab_size != tok.codebook_size:
        raise ValueError(f"AR vocabulary ({ar.vocab_size}) does not match the tokenizer codebook ({tok.codebook_size})")
    if ar.num_tokens != tok.num_tokens:
        raise ValueError(f"AR generates {ar.num_tokens} tokens but the tokenizer uses {tok.num_tokens}")


def check_labels(ar: ARModel, labels) -> torch.Tensor:
    labels = torch.as_tensor(labels, dtype=torch.int64).flatten()
    ar.check_labels(labels, allow_null=False)
    return labels


def check_prefix(tok: Tokenizer, prefix: Optional[torch.Tensor], batch: int) -> Optional[torch.Tensor]:
    if prefix is None:
        return None
    prefix = torch.as_tensor(prefix, dtype=torch.int64)
    if prefix.dim() == 1:
        prefix = prefix[None].expand(batch, -1)
    if prefix.dim() != 2 or prefix.shape[0] != batch:
        raise ValueError(f"prefix_tokens must be (B,P) with B={batch}, got {tuple(prefix.shape)}")
    if prefix.shape[1] > tok.num_tokens:
        raise ValueError(f"prefix_tokens has {prefix.shape[1]} tokens, longer than N={tok.num_tokens}")
    if prefix.numel() and (int(prefix.min()) < 0 or int(prefix.max()) >= tok.codebook_size):
        raise ValueError(f"prefix_tokens out of the codebook [0, {tok.codebook_size})")
    return prefix


@torch.no_grad()
def reference_sample(tok: Tokenizer, ar: ARModel, labels, cfg: CFG = 4.0, seed=0, temperature: float = 1.0,
                     top_k: int = 0, top_p: float = 1.0, prefix_tokens=None, sample_ids=None,
                     decode: bool = True) -> SampleOutput:
    """Generate images for `labels` (B,) with per-sample keys; see `resolve_keys` for `seed`."""
    check_compatible(tok, ar)
    labels = check_labels(ar, labels)
    B, N, dev = labels.numel(), tok.num_tokens, ar.device
    prefix = check_prefix(tok, prefix_tokens, B)
    seeds, ids = resolve_keys(seed, B, sample_ids)
    scales = cfg_schedule(cfg, N)
    guided = scales is not None
    P = 0 if prefix is None else prefix.shape[1]

    rows = 2 * B if guided else B
    lab = torch.cat([labels, torch.full_like(labels, ar.null_class)]) if guided else labels
    pre = None if prefix is None else (torch.cat([prefix, prefix]) if guided else prefix)
    ar.setup_cache(rows)
    tokens = torch.empty(B, N, dtype=torch.int64, device=dev)
    if P:
        tokens[:, :P] = prefix.to(dev)
    sd, sid = seeds.to(dev), ids.to(dev)
    if P < N:
        logits = ar.prefill(lab.to(dev), None if pre is None else pre.to(dev))      # (rows, V)
        for j in range(P, N):
            c, u = (logits[:B], logits[B:]) if guided else (logits, None)
            t = ops.sample_tokens(c, u, cfg_scale=float(scales[j]) if guided else 1.0, temperature=temperature,
                                  top_k=top_k, top_p=top_p, seeds=sd, sample_ids=sid, positions=j)
            tokens[:, j] = t
            if j < N - 1:
                logits = ar.decode_one(torch.cat([t, t]) if guided else t, j + 1)
    if not decode:
        return SampleOutput(images=None, tokens=tokens)
    H, W = tok.image_size
    noise = sample_noise(seeds, ids, (3, H, W))
    img = tok.decode(tokens.to(tok.device), noise=noise.to(tok.device, tok.dtype))
    return SampleOutput(images=images_to_uint8_ref(img.float()).cpu(), tokens=tokens.cpu(), noise=noise,
                        float_images=img)
