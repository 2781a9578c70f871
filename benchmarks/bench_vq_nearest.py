"""Benchmark vq_nearest: the fused Triton kernel against the torch reference (normalise, matmul, argmax).

Sizes are the tokenizer's: n = 16384 codes of d = 8, M = 256 tokens per image
for 1, 64 and 256 images. Figures: achieved TFLOP/s of the similarity
products (2*M*n*d) against the fp32 CUDA-core ceiling (the kernel does them
on FMA units, on purpose: TF32 would change the arg-max), and for the
reference also the bytes of the (M x n) matrix it writes and reads back.

    python benchmarks/bench_vq_nearest.py              # GPU, writes benchmarks/results/
    TRITON_INTERPRET=1 python benchmarks/bench_vq_nearest.py --smoke --device cpu --out /tmp/vq.json
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _common import common_args, device_info, finish, resolve_device, time_impls, triton_runnable  # noqa: E402
from dar_fast.kernels.vq_nearest import vq_nearest_ref, vq_nearest_triton  # noqa: E402


def main(argv=None):
    p = common_args(__doc__.splitlines()[0])
    p.add_argument("--images", type=int, nargs="+", default=[1, 64, 256], help="M = 256 * images")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    info = device_info(device)
    interp = device.type != "cuda"
    if args.smoke:
        cases, rep_ms = [(32, 256, 8), (17, 100, 13)], args.rep_ms or 20.0
    else:
        cases, rep_ms = [(256 * b, 16384, 8) for b in args.images], args.rep_ms or 200.0
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for M, n, d in cases:
        z = torch.randn(M, d, device=device, dtype=dtype)
        cb = torch.randn(n, d, device=device)
        impls = {"torch": lambda: vq_nearest_ref(z, cb)}
        if triton_runnable(device):
            impls["triton"] = lambda: vq_nearest_triton(z, cb)
            if device.type == "cuda":   # the other similarity path, for the record (d < 16: FMA outer product)
                impls["triton_dot"] = lambda: vq_nearest_triton(z, cb, use_dot=True)
        mism = {}
        ref = vq_nearest_ref(z, cb)
        for name, fn in impls.items():
            mism[name] = int((fn() != ref).sum())
        eb = z.element_size()
        kernel_bytes = M * d * eb + n * d * 4 + M * 8
        nbytes = {name: kernel_bytes for name in impls}
        nbytes["torch"] = kernel_bytes + 2 * M * n * 4            # the (M x n) fp32 matrix, written and read
        for rec in time_impls(f"M={M} n={n} d={d}", impls, device, info, nbytes=nbytes, flops=2.0 * M * n * d,
                              flop_ceiling="fp32_tflops", rep_ms=rep_ms,
                              max_iters={"triton": 1} if interp else None,
                              extra=dict(M=M, n=n, d=d, dtype=str(dtype).replace("torch.", ""))):
            rec["index_mismatches_vs_torch"] = mism[rec["impl"]]
            rows.append(rec)
    finish("vq_nearest", rows, device, args)


if __name__ == "__main__":
    main()
