"""Bounded memory for any number of labels: the default chunk size of `Pipeline.sample/stream`.

Sampling B labels at once holds, per sample, the AR model's KV cache, its logits and activations, the
tokenizer decoder's K/V and the DiT's activations and pixel buffers. 100,000 labels of D-AR-L in one call
would need 24 layers x 257 slots x 1024 x 2 (K,V) x 2 B (bf16) x 2 (CFG rows) = 50.5 MB of KV cache per
sample, 5 TB in all: the call is cut into chunks of `max_batch` labels instead, each sampled with its own keys
(seed, global index), so the result is identical to one batch (keyed sampling: a sample does not depend on
its batch).

`estimate_sample_bytes` is an upper estimate (a factor 2 over the sum of the buffers listed above, which
leaves room for the temporaries it does not itemise); `default_max_batch` fits the chunk into a fraction of
the memory free on the device (CUDA: 50% of free memory; CPU: 25% of MemAvailable) and caps it where larger
batches stop paying (CPU 1024, CUDA 65536).
"""
from __future__ import annotations

import os
from typing import Iterator, Tuple

import torch

CPU_FRACTION, CUDA_FRACTION = 0.25, 0.5
CPU_CAP, CUDA_CAP = 1024, 65536


def _elt(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def estimate_sample_bytes(tok, ar, guided: bool = True) -> int:
    """Upper estimate of the memory one sample needs while a batch is generated (bytes)."""
    rows = 2 if guided else 1
    N = int(ar.num_tokens)
    e_ar = _elt(ar.dtype)
    kv = sum(2 * (N + 1) * layer.attention.n_kv * layer.attention.hd for layer in ar.layers) * e_ar * rows
    dim = int(ar.cfg.dim) if hasattr(ar.cfg, "dim") else 0
    act_ar = rows * (8 * dim * e_ar + 4 * int(ar.vocab_size) * 4)          # activations + float32 logits copies
    c = tok.cfg
    e_tok = _elt(tok.dtype)
    H, W = (int(s) for s in tok.image_size)
    dec_kv = 2 * int(c.num_decoder_layers) * int(c.num_all_queries) * int(c.decoder_dim) * e_tok
    dd = c.diff_decoder
    patches = max(1, (H // int(dd.patch_size)) * (W // int(dd.patch_size)))
    act_dit = 12 * patches * int(dd.dim) * 4
    pixels = 8 * 3 * H * W * 4                                            # noise, x, v, v_prev, preview, ...
    return 2 * (kv + act_ar + dec_kv + act_dit + pixels)


def free_bytes(device) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_FRACTION)
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            avail = 4 << 30
    return int(avail * CPU_FRACTION)


def default_max_batch(tok, ar, guided: bool = True) -> int:
    """Labels per chunk: what fits in the free memory (see the module docstring), at least 1."""
    device = ar.device
    cap = CUDA_CAP if torch.device(device).type == "cuda" else CPU_CAP
    return int(max(1, min(cap, free_bytes(device) // max(1, estimate_sample_bytes(tok, ar, guided)))))


def chunks(n: int, size: int) -> Iterator[Tuple[int, int]]:
    """(start, stop) of consecutive chunks of at most `size` items covering range(n)."""
    for a in range(0, n, size):
        yield a, min(n, a + size)
