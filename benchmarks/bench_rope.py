"""Benchmark apply_rope: the one-pass Triton kernel against the torch reference.

Cases at D-AR scale:
  tokenizer  2D RoPE, B=64, T=1024 patches + 256 identity query tokens, H=12, D=64, q/k contiguous
             (forward; forward in place; forward + backward as in training)
  ar_decode  1D RoPE, one token for a CFG batch of B=2*64, H=16, D=64, q/k views into the fused wqkv
             output (what one decode step does); also timed inside a CUDA graph (launch removed)
Figure: achieved GB/s of the minimum traffic (read q and k once, write them once) against HBM bandwidth.

    python benchmarks/bench_rope.py
    TRITON_INTERPRET=1 python benchmarks/bench_rope.py --smoke --device cpu --out /tmp/rope.json
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _common import common_args, finish, kernel_context, time_impls  # noqa: E402
from dar_fast.kernels.rope import apply_rope_ref, grid_positions, rope_triton, RopeFunction  # noqa: E402


def main(argv=None):
    p = common_args(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    device, info, interp, dtype, has_triton = kernel_context(args)
    if args.smoke:
        tok, dec, rep_ms = dict(B=1, grid=2, Q=2, H=2), dict(B=2, H=2), args.rep_ms or 20.0
    else:
        tok, dec, rep_ms = dict(B=64, grid=32, Q=256, H=12), dict(B=128, H=16), args.rep_ms or 200.0
    D = 64
    max_iters = {"triton": 1, "triton_inplace": 1} if interp else None
    rows = []

    # --- tokenizer: 2D positions for the patch grid, identity for the queries
    B, H, g = tok["B"], tok["H"], tok["grid"]
    pos = grid_positions(g, g, num_identity=tok["Q"], device=device)
    T = pos.shape[0]
    q = torch.randn(B, T, H, D, device=device, dtype=dtype)
    k = torch.randn(B, T, H, D, device=device, dtype=dtype)
    io = 2 * (q.numel() + k.numel()) * q.element_size()              # read + write q and k
    extra = dict(B=B, T=T, H=H, D=D, P=2, dtype=str(dtype).replace("torch.", ""))
    impls = {"torch": lambda: apply_rope_ref(q, k, pos)}
    if has_triton:
        impls["triton"] = lambda: rope_triton(q, k, pos)
        impls["triton_inplace"] = lambda: rope_triton(q, k, pos, out_q=q, out_k=k)
    rows += time_impls("tokenizer 2D fwd", impls, device, info, nbytes=io, rep_ms=rep_ms, max_iters=max_iters,
                       extra=extra)

    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
    gq, gk = torch.randn_like(q), torch.randn_like(k)

    def fwd_bwd(fn):
        def run():
            qo, ko = fn(qg, kg, pos)
            torch.autograd.backward((qo, ko), (gq, gk))
        return run

    impls = {"torch": fwd_bwd(apply_rope_ref)}
    if has_triton:
        impls["triton"] = fwd_bwd(lambda a, b, p: RopeFunction.apply(a, b, p, 10000.0))
    # forward + backward: the rotation twice, plus autograd's accumulation of .grad (read + write q, k)
    rows += time_impls("tokenizer 2D fwd+bwd", impls, device, info, nbytes=3 * io, rep_ms=rep_ms,
                       max_iters=max_iters, extra=extra)

    # --- AR decode: one token, q/k views into the fused qkv projection output
    B, H = dec["B"], dec["H"]
    qkv = torch.randn(B, 1, 3 * H * D, device=device, dtype=dtype)
    q = qkv[..., :H * D].view(B, 1, H, D)
    k = qkv[..., H * D:2 * H * D].view(B, 1, H, D)
    pos = torch.tensor([[200]], device=device, dtype=torch.int32)
    io = 2 * (q.numel() + k.numel()) * q.element_size()
    extra = dict(B=B, T=1, H=H, D=D, P=1, dtype=str(dtype).replace("torch.", ""))
    impls = {"torch": lambda: apply_rope_ref(q, k, pos)}
    if has_triton:
        impls["triton"] = lambda: rope_triton(q, k, pos)
    rows += time_impls("ar_decode 1D", impls, device, info, nbytes=io, rep_ms=rep_ms, max_iters=max_iters,
                       extra=extra)
    if device.type == "cuda":
        rows += time_impls("ar_decode 1D (cuda graph)", impls, device, info, nbytes=io, rep_ms=rep_ms,
                           cuda_graph=True, extra=extra)

    finish("rope", rows, device, args)


if __name__ == "__main__":
    main()
