"""Benchmark the DiT adaLN ops: LayerNorm + modulate, and the gated residual fused with the next modulation.

Case at D-AR tokenizer scale: B = 8 images, T = 1024 pixel tokens (256x256, patch 8), C = 768, per-token
modulation (views of one (B, T, 6C) buffer, as the DiT has them):
  modulate        LN(x) * (1 + scale) + shift
  gated+modulate  h = x + gate * y; LN(h) * (1 + scale) + shift   (both outputs)
  gated+modulate fwd+bwd (training)
Figure: achieved GB/s of the minimum traffic (each input read once, each output written once) against HBM bandwidth.

    python benchmarks/bench_adaln.py
    TRITON_INTERPRET=1 python benchmarks/bench_adaln.py --smoke --device cpu --out /tmp/adaln.json
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _common import common_args, finish, kernel_context, time_impls  # noqa: E402
from dar_fast.kernels.adaln import (AdaLNFunction, adaln_fwd_triton, adaln_modulate_ref,  # noqa: E402
                                    gated_residual_ref)


def main(argv=None):
    p = common_args(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    device, info, interp, dtype, has_triton = kernel_context(args)
    if args.smoke:
        B, T, C, rep_ms = 1, 6, 64, args.rep_ms or 20.0
    else:
        B, T, C, rep_ms = 8, 1024, 768, args.rep_ms or 200.0
    max_iters = {"triton": 1} if interp else None
    esz = torch.empty((), dtype=dtype).element_size()
    n = B * T * C
    extra = dict(B=B, T=T, C=C, dtype=str(dtype).replace("torch.", ""))
    rows = []

    x, y = torch.randn(B, T, C, device=device, dtype=dtype), torch.randn(B, T, C, device=device, dtype=dtype)
    gate, shift, scale = torch.randn(B, T, 3 * C, device=device, dtype=dtype).chunk(3, -1)
    impls = {"torch": lambda: adaln_modulate_ref(x, shift, scale)}
    if has_triton:
        impls["triton"] = lambda: adaln_fwd_triton(x, None, None, shift, scale, 1e-6, True)
    rows += time_impls("modulate", impls, device, info, nbytes=4 * n * esz, rep_ms=rep_ms, max_iters=max_iters,
                       extra=extra)
    impls = {"torch": lambda: gated_residual_ref(x, gate, y, shift, scale)}
    if has_triton:
        impls["triton"] = lambda: adaln_fwd_triton(x, gate, y, shift, scale, 1e-6, True)
    rows += time_impls("gated+modulate", impls, device, info, nbytes=7 * n * esz, rep_ms=rep_ms,
                       max_iters=max_iters, extra=extra)

    leaves = [t.detach().clone().requires_grad_() for t in (x, y, gate, shift, scale)]
    go, gh = torch.randn_like(x), torch.randn_like(x)

    def fwd_bwd(fn):
        def run():
            for t in leaves:
                t.grad = None
            h, o = fn(*leaves)
            torch.autograd.backward((h, o), (gh, go))
        return run

    impls = {"torch": fwd_bwd(lambda a, b, g, s, c: gated_residual_ref(a, g, b, s, c))}
    if has_triton:
        impls["triton"] = fwd_bwd(lambda a, b, g, s, c: AdaLNFunction.apply(a, g, b, s, c, 1e-6, True))
    # forward 7 moves; backward reads h, gate, y, scale, go, gh and writes dh, dscale, dy, dgate: 10 moves
    rows += time_impls("gated+modulate fwd+bwd", impls, device, info, nbytes=17 * n * esz, rep_ms=rep_ms,
                       max_iters=max_iters, extra=extra)

    finish("adaln", rows, device, args)


if __name__ == "__main__":
    main()
