"""Benchmark the initial pixel noise: the keyed Triton kernel on the device against the host paths.

Cases: batch 1 and batch 64 images of 3 x 256 x 256 (smoke: 2 x 3 x 4 x 4).
  torch       the exact PyTorch reference (`keyed_normal_ref`, float64 on the CPU), then copied to the device
  host_randn  what the sampler did before: a torch.Generator seeded per sample, randn, then copied
  triton      the kernel, drawn where it is used (nothing crosses the bus)
Figure: GB/s of the float32 noise written (4 bytes per element).

    python benchmarks/bench_noise.py
    TRITON_INTERPRET=1 python benchmarks/bench_noise.py --smoke --device cpu --out /tmp/noise.json
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _common import common_args, finish, kernel_context, time_impls  # noqa: E402
from dar_fast.kernels.noise import keyed_normal_ref, keyed_normal_triton  # noqa: E402
from dar_fast.seeding import noise_seed  # noqa: E402


def host_randn(seeds, ids, n, device):
    out = torch.empty(len(seeds), n)
    g = torch.Generator()
    for b, (s, i) in enumerate(zip(seeds.tolist(), ids.tolist())):
        g.manual_seed(noise_seed(s, i))
        out[b] = torch.randn(n, generator=g)
    return out.to(device)


def main(argv=None):
    p = common_args(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    device, info, interp, _, has_triton = kernel_context(args)
    if args.smoke:
        n, batches, rep_ms = 3 * 4 * 4, {"batch2": 2}, args.rep_ms or 20.0
    else:
        n, batches, rep_ms = 3 * 256 * 256, {"batch1": 1, "batch64": 64}, args.rep_ms or 200.0
    rows = []
    for case, B in batches.items():
        seeds = torch.arange(B, dtype=torch.int64) + 1234
        ids = torch.arange(B, dtype=torch.int64)
        seeds_d, ids_d = seeds.to(device), ids.to(device)
        impls = {"torch": lambda: keyed_normal_ref(seeds, ids, n, device),
                 "host_randn": lambda: host_randn(seeds, ids, n, device)}
        if has_triton:
            impls["triton"] = lambda: keyed_normal_triton(seeds_d, ids_d, n, device)
        max_iters = {"triton": 1, "torch": 3 if B > 8 else None} if interp else None
        rows += time_impls(case, impls, device, info, nbytes=4 * B * n, rep_ms=rep_ms, max_iters=max_iters,
                           extra=dict(B=B, elements_per_sample=n))
        if has_triton:
            same = torch.equal(keyed_normal_triton(seeds_d, ids_d, n, device).cpu(), keyed_normal_ref(seeds, ids, n))
            for r in rows[-len(impls):]:
                r["triton_bits_equal_reference"] = same

    finish("noise", rows, device, args)


if __name__ == "__main__":
    main()
