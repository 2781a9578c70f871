"""Fused token sampler: compiled op (C++ on CPU, CUDA kernel on GPU) against the PyTorch reference.

One decode step's sampling with classifier-free guidance at the released vocabulary (V = 16384):
cond and uncond logits (bf16 on GPU, float32 on CPU) -> one token per row, for B in 1, 16, 64, 256,
512; plain (the paper's FID setting: no top-k / top-p) and filtered (top-k 100, top-p 0.9).
Reported: ms per call, GB/s of logits read (2 * B * V * itemsize bytes, the op's only large
traffic) and its fraction of the device's memory bandwidth, and the speed-up over the reference.
On CUDA the compiled op is timed inside a CUDA graph (how the engine runs it: launch overhead
removed); the reference runs eagerly.

    python benchmarks/bench_sample_tokens.py                        # GPU, full sizes
    python benchmarks/bench_sample_tokens.py --smoke --device cpu   # tiny CI run
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (bench, common_args, default_out, device_info, print_row, rates,  # noqa: E402
                     resolve_device, write_results)

from dar_fast.kernels import sample_tokens as st  # noqa: E402

FILTERS = {"plain": dict(), "top_k100_top_p0.9": dict(top_k=100, top_p=0.9)}


def make_inputs(B: int, V: int, dtype, device):
    g = torch.Generator().manual_seed(B)
    c = (3 * torch.randn(B, V, generator=g)).to(device=device, dtype=dtype)
    u = (3 * torch.randn(B, V, generator=g)).to(device=device, dtype=dtype)
    keys = dict(seeds=torch.arange(B, device=device), sample_ids=torch.arange(B, device=device) * 7919,
                positions=torch.full((B,), 17, dtype=torch.int64, device=device))
    return c, u, torch.full((B,), 4.0, device=device), keys


def main():
    p = common_args(__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256, 512])
    p.add_argument("--ref-max-batch", type=int, default=None,
                   help="largest batch the reference is timed at (default: all on GPU, 64 on CPU)")
    args = p.parse_args()
    device = resolve_device(args.device)
    info = device_info(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    V, batches = args.vocab, args.batches
    ref_max = args.ref_max_batch if args.ref_max_batch is not None else (10 ** 9 if device.type == "cuda" else 64)
    rep_ms = args.rep_ms or (100.0 if device.type == "cuda" else 300.0)
    max_iters = None
    if args.smoke:
        V, batches, rep_ms, max_iters = 4096, [1, 8], 20.0, 3
    status = st.extension_status()
    have_ext = status["built"] and (device.type == "cpu" or status["cuda"])
    if not have_ext:
        print(f"dar_fast._C unavailable here ({status}); timing the reference only", flush=True)
    os.environ.pop("DAR_FAST_BACKEND", None)
    rows = []
    for fname, fkw in FILTERS.items():
        for B in batches:
            c, u, scale, keys = make_inputs(B, V, dtype, device)
            nbytes = 2 * B * V * c.element_size()
            common = dict(filters=fname, B=B, V=V, dtype=str(dtype).replace("torch.", ""))

            def ext():
                return st.sample_tokens(c, u, scale, **fkw, **keys)

            def ref():
                return st.sample_tokens_ref(c, u, scale, **fkw, **keys)

            ext_ms = None
            if have_ext:
                assert torch.equal(ext().cpu(), ref().cpu()), "compiled op and reference disagree"
                t = bench(ext, device, rep_ms=rep_ms, cuda_graph=device.type == "cuda", max_iters=max_iters)
                ext_ms = t["ms"]
                rec = dict(impl="cuda" if device.type == "cuda" else "cpp", **common, **t,
                           **rates(t["ms"], info, nbytes=nbytes))
                rows.append(rec)
                print_row(rec)
            if B <= ref_max:
                t = bench(ref, device, rep_ms=rep_ms, max_iters=max_iters)
                rec = dict(impl="reference", **common, **t, **rates(t["ms"], info, nbytes=nbytes))
                if ext_ms:
                    rec["speedup_of_compiled"] = t["ms"] / ext_ms
                rows.append(rec)
                print_row(rec)
    out = args.out or default_out("sample_tokens", device, args.smoke)
    write_results(out, "sample_tokens", rows, device, smoke=args.smoke,
                  extra={"extension": status, "torch_threads": torch.get_num_threads()})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
