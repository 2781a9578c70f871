"""Benchmark decode attention over a static KV cache: the split-K Triton kernel (used prefix only) against
the masked SDPA over the whole cache that the unfused model runs.

Cases at D-AR-L scale (Hq = Hk = 16, D = 64, S_max = 257 slots, cache length 200 of 257):
  batch1   B = 2 rows (one image with CFG): the prefix is split over the SMs (flash-decoding)
  batch64  B = 128 rows: one split
each also inside a CUDA graph on a GPU. Bytes: what each implementation must read (torch: the whole
static K and V cache; triton: the used prefix), against HBM bandwidth.

    python benchmarks/bench_decode_attention.py
    TRITON_INTERPRET=1 python benchmarks/bench_decode_attention.py --smoke --device cpu --out /tmp/da.json
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _common import common_args, finish, kernel_context, time_impls  # noqa: E402
from dar_fast.kernels.decode_attention import choose_splits, decode_attention_triton  # noqa: E402


def main(argv=None):
    p = common_args(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    device, info, interp, dtype, has_triton = kernel_context(args)
    if args.smoke:
        H, D, S, n, batches, rep_ms = 2, 16, 33, 20, {"batch1": 2}, args.rep_ms or 20.0
    else:
        H, D, S, n, batches, rep_ms = 16, 64, 257, 200, {"batch1": 2, "batch64": 128}, args.rep_ms or 200.0
    max_iters = {"triton": 1} if interp else None
    esz = torch.empty((), dtype=dtype).element_size()
    rows = []
    for case, B in batches.items():
        q = torch.randn(B, H, D, device=device, dtype=dtype)
        k = torch.randn(B, H, S, D, device=device, dtype=dtype)
        v = torch.randn_like(k)
        cl = torch.full((B,), n, dtype=torch.int32, device=device)
        mask = (torch.arange(S, device=device) < n).view(1, 1, 1, S).expand(B, 1, 1, S)

        def masked_sdpa():      # the unfused model: SDPA of (B, H, 1, D) over all S slots with a boolean mask
            return F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask)[:, :, 0]

        impls = {"torch": masked_sdpa}
        if has_triton:
            impls["triton"] = lambda: decode_attention_triton(q, k, v, cl)
        nbytes = {"torch": 2 * B * H * S * D * esz + B * S, "triton": 2 * B * H * n * D * esz}
        extra = dict(B=B, H=H, D=D, S_max=S, len=n, splits=choose_splits(B, H, S),
                     dtype=str(dtype).replace("torch.", ""))
        rows += time_impls(case, impls, device, info, nbytes=nbytes, rep_ms=rep_ms, max_iters=max_iters, extra=extra)
        if device.type == "cuda":
            rows += time_impls(f"{case} (cuda graph)", impls, device, info, nbytes=nbytes, rep_ms=rep_ms,
                               cuda_graph=True, extra=extra)

    finish("decode_attention", rows, device, args)


if __name__ == "__main__":
    main()
