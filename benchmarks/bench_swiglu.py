"""Benchmark swiglu over a merged [w1; w3] output: the one-pass Triton kernel against the torch reference.

Cases at D-AR-L scale (ffn hidden H = 2816):
  ar_decode   M = 2 x 64 CFG rows (one decode step's FFN); also timed inside a CUDA graph
  train       M = 32 x 256 tokens, forward + backward (AR training)
Figure: achieved GB/s of the minimum traffic (forward: read 2H, write H per row; backward: read 2H + H,
write 2H) against HBM bandwidth.

    python benchmarks/bench_swiglu.py
    TRITON_INTERPRET=1 python benchmarks/bench_swiglu.py --smoke --device cpu --out /tmp/swiglu.json
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _common import common_args, finish, kernel_context, time_impls  # noqa: E402
from dar_fast.kernels.swiglu import SwiGLUFunction, swiglu_fwd_triton, swiglu_ref  # noqa: E402


def main(argv=None):
    p = common_args(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    device, info, interp, dtype, has_triton = kernel_context(args)
    if args.smoke:
        dec_m, train_m, H, rep_ms = 6, 12, 80, args.rep_ms or 20.0
    else:
        dec_m, train_m, H, rep_ms = 128, 32 * 256, 2816, args.rep_ms or 200.0
    max_iters = {"triton": 1} if interp else None
    esz = torch.empty((), dtype=dtype).element_size()
    tag = str(dtype).replace("torch.", "")
    rows = []

    x = torch.randn(dec_m, 2 * H, device=device, dtype=dtype)
    impls = {"torch": lambda: swiglu_ref(x)}
    if has_triton:
        impls["triton"] = lambda: swiglu_fwd_triton(x)
    io = 3 * dec_m * H * esz
    rows += time_impls("ar_decode", impls, device, info, nbytes=io, rep_ms=rep_ms, max_iters=max_iters,
                       extra=dict(M=dec_m, H=H, dtype=tag))
    if device.type == "cuda":
        rows += time_impls("ar_decode (cuda graph)", impls, device, info, nbytes=io, rep_ms=rep_ms, cuda_graph=True,
                           extra=dict(M=dec_m, H=H, dtype=tag))

    xt = torch.randn(train_m, 2 * H, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(train_m, H, device=device, dtype=dtype)

    def fwd_bwd(fn):
        def run():
            xt.grad = None
            fn(xt).backward(g)
        return run

    impls = {"torch": fwd_bwd(swiglu_ref)}
    if has_triton:
        impls["triton"] = fwd_bwd(SwiGLUFunction.apply)
    io = (3 + 5) * train_m * H * esz
    rows += time_impls("train fwd+bwd", impls, device, info, nbytes=io, rep_ms=rep_ms, max_iters=max_iters,
                       extra=dict(M=train_m, H=H, dtype=tag))

    finish("swiglu", rows, device, args)


if __name__ == "__main__":
    main()
