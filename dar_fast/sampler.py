"""The reference sampler: plain eager PyTorch, obviously right, the baseline the fast engine must equal.

Class-conditional AR generation with the KV cache over a [cond; null] batch,
CFG with a constant scale or a linear (start, end) schedule, temperature,
top-k, top-p, keyed draws (`ops.sample_tokens`), then the K-step decode.
"""
from __future__ import annotations

import torch

from dar_fast import ops
from dar_fast.kernels.flow_step import images_to_uint8_ref
from dar_fast.models import ARModel, Tokenizer
from dar_fast.sampling_args import (CFG, SampleOutput, cfg_schedule, check_compatible, check_labels,  # noqa: F401
                                    check_prefix, check_sampling_args)
from dar_fast.seeding import resolve_keys, sample_noise


@torch.no_grad()
def reference_sample(tok: Tokenizer, ar: ARModel, labels, cfg: CFG = 4.0, seed=0, temperature: float = 1.0,
                     top_k: int = 0, top_p: float = 1.0, prefix_tokens=None, sample_ids=None,
                     decode: bool = True) -> SampleOutput:
    """Generate images for `labels` (B,) with per-sample keys; see `resolve_keys` for `seed`."""
    check_compatible(tok, ar)
    check_sampling_args(cfg, temperature, top_k, top_p)
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
