"""Benchmark rms_norm (+ fused residual add): the one-pass Triton kernel against the torch reference.

Cases at D-AR-L scale (C = 1024):
  ar_decode   M = 2 x 64 CFG rows, residual fused (what each block does twice per decode step);
              also timed inside a CUDA graph (launch removed)
  train       M = 32 x 256 tokens, forward + backward (AR training)
Figure: achieved GB/s of the minimum traffic (read x (and r) and w once, write y (and h) once) against HBM
bandwidth.

    python benchmarks/bench_rms_norm.py
    TRITON_INTERPRET=1 python benchmarks/bench_rms_norm.py --smoke --device cpu --out /tmp/rms_norm.json
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _common import common_args, finish, kernel_context, time_impls  # noqa: E402
from dar_fast.kernels.rms_norm import RMSNormFunction, rms_norm_fwd_triton, rms_norm_ref  # noqa: E402


def main(argv=None):
    p = common_args(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    device, info, interp, dtype, has_triton = kernel_context(args)
    if args.smoke:
        dec_m, train_m, C, rep_ms = 6, 12, 96, args.rep_ms or 20.0
    else:
        dec_m, train_m, C, rep_ms = 128, 32 * 256, 1024, args.rep_ms or 200.0
    max_iters = {"triton": 1} if interp else None
    esz = torch.empty((), dtype=dtype).element_size()
    rows = []

    x = torch.randn(dec_m, C, device=device, dtype=dtype)
    r = torch.randn(dec_m, C, device=device, dtype=dtype)
    w = torch.randn(C, device=device, dtype=dtype)
    io = 4 * dec_m * C * esz + C * esz                                  # x, r read; y, h written; w read
    extra = dict(M=dec_m, C=C, residual=True, dtype=str(dtype).replace("torch.", ""))
    impls = {"torch": lambda: rms_norm_ref(x, w, 1e-5, r)}
    if has_triton:
        impls["triton"] = lambda: rms_norm_fwd_triton(x, w, 1e-5, r)
    rows += time_impls("ar_decode fused residual", impls, device, info, nbytes=io, rep_ms=rep_ms,
                       max_iters=max_iters, extra=extra)
    if device.type == "cuda":
        rows += time_impls("ar_decode fused residual (cuda graph)", impls, device, info, nbytes=io, rep_ms=rep_ms,
                           cuda_graph=True, extra=extra)

    xt = torch.randn(train_m, C, device=device, dtype=dtype, requires_grad=True)
    wt = torch.randn(C, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(train_m, C, device=device, dtype=dtype)

    def fwd_bwd(fn):
        def run():
            xt.grad = wt.grad = None
            fn(xt, wt).backward(g)
        return run

    impls = {"torch": fwd_bwd(lambda a, b: rms_norm_ref(a, b, 1e-5))}
    if has_triton:
        impls["triton"] = fwd_bwd(lambda a, b: RMSNormFunction.apply(a, b, None, 1e-5))
    # forward: read x, write y; backward: read x, gy, write dx (w and the partial dw rows are small)
    io = 5 * train_m * C * esz
    rows += time_impls("train fwd+bwd", impls, device, info, nbytes=io, rep_ms=rep_ms, max_iters=max_iters,
                       extra=dict(M=train_m, C=C, residual=False, dtype=str(dtype).replace("torch.", "")))

    finish("rms_norm", rows, device, args)


if __name__ == "__main__":
    main()
