"""Projected FID-50K generation time per preset, from the engine's measured throughput.

For each preset: measured images/s of the streaming engine at the FID batch size (CFG on, as the paper's
runs), the projected wall time of 50,000 samples on 1 and on `--gpus` devices (the generator shards
with no communication, so it scales linearly), and the physical limit from the performance model in dar_fast/perf.py
(100% of the bf16 matrix rate).

    python benchmarks/bench_fid.py                        # GPU
    python benchmarks/bench_fid.py --smoke --device cpu   # tiny CI run
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import common_args, default_out, device_info, print_row, resolve_device, write_results  # noqa: E402
from bench_sampling import build, smoke_configs, time_engine  # noqa: E402

from dar_fast.config import ar_config, tokenizer_config  # noqa: E402
from dar_fast.perf import image_flops  # noqa: E402
from dar_fast.pipeline import Pipeline  # noqa: E402

PAPER_CFG = {"D-AR-L": (1.1, 8.0), "D-AR-XL": (1.1, 10.0), "D-AR-XXL": (1.1, 11.0)}


def main():
    p = common_args(__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["D-AR-L", "D-AR-XL", "D-AR-XXL"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-samples", type=int, default=50000)
    p.add_argument("--gpus", type=int, default=8)
    args = p.parse_args()
    device = resolve_device(args.device)
    info = device_info(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tflops = info.get("bf16_tflops_measured") or info.get("bf16_tflops") or info.get("fp32_tflops") or 1.0
    if args.smoke:
        tok_cfg, models = smoke_configs()
        B = 4
    else:
        tok_cfg = tokenizer_config("tokenizer_v1")
        tok_cfg.repa_head = False
        models = {n: ar_config(n) for n in args.presets}
        B = args.batch_size
    rows = []
    for name, acfg in models.items():
        tok, ar = build(tok_cfg, acfg, device, dtype)
        pipe = Pipeline(tokenizer=tok, ar=ar)
        sec, prof, _ = time_engine(pipe, B, PAPER_CFG.get(name, (1.1, 10.0)), reps=1 if args.smoke else 2)
        ips = B / sec
        limit_ips = tflops * 1e12 / image_flops(tok_cfg, acfg)
        rec = dict(model=name, batch=B, images_per_s=ips,
                   projected_minutes=args.num_samples / ips / 60,
                   projected_minutes_per_gpus=args.num_samples / ips / 60 / args.gpus, gpus=args.gpus,
                   physical_limit_minutes=args.num_samples / limit_ips / 60,
                   fraction_of_limit=ips / limit_ips,
                   ar_share=prof.get("ar", 0) / max(sum(prof.values()), 1e-9))
        rows.append(rec)
        print_row(rec)
        del tok, ar, pipe
    out = args.out or default_out("fid", device, args.smoke)
    write_results(out, "fid50k", rows, device, smoke=args.smoke, extra={"num_samples": args.num_samples})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
