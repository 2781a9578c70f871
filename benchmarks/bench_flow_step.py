"""Benchmark flow_step: the fused Triton step against the torch reference.

At the decoder's scale, x, v, v_prev of (64, 3, 256, 256), fp32 and bf16:
  euler          x + dt * v
  ab             x + dt * (1.5 v - 0.5 v_prev), per-sample device times
  ab_uint8       the last step (or a preview) straight to the (B,H,W,3) uint8 image
                 (reference: step, / data_std, images_to_uint8_ref)
Figure: achieved GB/s of the minimum traffic (each input read once, the output written once)
against HBM bandwidth.

    python benchmarks/bench_flow_step.py
    TRITON_INTERPRET=1 python benchmarks/bench_flow_step.py --smoke --device cpu --out /tmp/flow.json
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _common import common_args, device_info, finish, resolve_device, time_impls, triton_runnable  # noqa: E402
from dar_fast.kernels.flow_step import flow_output_ref, flow_step_triton  # noqa: E402


def main(argv=None):
    p = common_args(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    info = device_info(device)
    interp = device.type != "cuda"
    if args.smoke:
        shape, dtypes, rep_ms = (2, 3, 16, 16), [torch.float32], args.rep_ms or 20.0
    else:
        shape, dtypes, rep_ms = (64, 3, 256, 256), [torch.float32, torch.bfloat16], args.rep_ms or 200.0
    B = shape[0]
    data_std = 0.5
    rows = []
    for dtype in dtypes:
        x, v, vp = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
        t = torch.full((B,), 0.25, device=device)
        tn = torch.full((B,), 0.375, device=device)
        n, eb = x.numel(), x.element_size()
        for case, prev, tt, uint8 in (("euler", None, (0.25, 0.375), False), ("ab", vp, (t, tn), False),
                                      ("ab_uint8", vp, (t, tn), True)):
            ds = data_std if uint8 else None
            impls = {"torch": lambda: flow_output_ref(x, v, prev, *tt, data_std=ds, to_uint8=uint8)}
            if triton_runnable(device):
                impls["triton"] = lambda: flow_step_triton(x, v, prev, *tt, data_std=ds, to_uint8=uint8)
            reads = (2 if prev is None else 3) * n * eb
            nbytes = reads + (n if uint8 else n * eb)
            rows += time_impls(f"{case} {tuple(shape)}", impls, device, info, nbytes=nbytes, rep_ms=rep_ms,
                               max_iters={"triton": 1} if interp else None,
                               extra=dict(shape=list(shape), dtype=str(dtype).replace("torch.", "")))
    finish("flow_step", rows, device, args)


if __name__ == "__main__":
    main()
