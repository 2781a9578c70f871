"""Sampling throughput and latency of the streaming engine against the eager reference and the hardware floors.

Per preset (D-AR-L / XL / XXL with the tokenizer_v1 decoder; random weights time the same as trained ones):
images/s at batch 1, 16, 64, 256 with CFG, the AR / tokenizer split, batch-1 latency and time to the first
preview, the eager reference sampler at batch 1 and 64 (speed-up ratio), and the floors of DESIGN.md's
performance model (weight-read floor for batch-1 AR, FLOP floor for large batches) with the fraction reached.

    python benchmarks/bench_sampling.py                       # GPU, full sizes
    python benchmarks/bench_sampling.py --smoke --device cpu  # tiny CI run
"""
from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import common_args, default_out, device_info, print_row, resolve_device, write_results  # noqa: E402

from dar_fast.config import ARConfig, DiffDecoderConfig, TokenizerConfig, ar_config, tokenizer_config  # noqa: E402
from dar_fast.models import ARModel, Tokenizer  # noqa: E402
from dar_fast.perf import ar_weight_bytes, floors, image_flops  # noqa: E402
from dar_fast.pipeline import Pipeline  # noqa: E402
from dar_fast.sampler import reference_sample  # noqa: E402


def build(tok_cfg: TokenizerConfig, ar_cfg: ARConfig, device, dtype):
    torch.manual_seed(0)
    tok = Tokenizer(tok_cfg).to(device=device, dtype=dtype).eval()
    ar = ARModel(ar_cfg).to(device=device, dtype=dtype).eval()
    with torch.no_grad():      # released init zeroes gates / output layers; random weights time the same
        for p in list(tok.parameters()) + list(ar.parameters()):
            p.normal_(0, 0.02)
    return tok, ar


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def smoke_configs():
    """A tokenizer and AR model small enough to time on a CPU in seconds."""
    tok_cfg = TokenizerConfig(encoder_patch_size=8, num_encoder_layers=1, num_decoder_layers=1, encoder_dim=64,
                              decoder_dim=64, vq_codebook_size=64, num_denoising_steps=4, num_query_groups=4,
                              num_all_queries=16, queries_per_step=4, sampling_resolution=32, repa_head=False,
                              diff_decoder=DiffDecoderConfig(dim=64, cond_dim=64, patch_size=4, depth=1))
    return tok_cfg, {"smoke": ARConfig(dim=64, n_layer=2, n_head=2, vocab_size=64, block_size=16, num_classes=10)}


def time_engine(pipe: Pipeline, batch: int, cfg, reps: int):
    labels = torch.arange(batch) % pipe.num_classes
    pipe.sample(labels, cfg=cfg)                                     # warm up (graph capture, autotune)
    prof = {}
    best = float("inf")
    first_preview = None
    for _ in range(reps):
        sync(pipe.device)
        t0 = time.perf_counter()
        for step in pipe.stream(labels, cfg=cfg, previews=batch == 1):
            if step.group == 0 and first_preview is None and batch == 1:
                first_preview = time.perf_counter() - t0
        sync(pipe.device)
        best = min(best, time.perf_counter() - t0)
    list(pipe.stream(labels, cfg=cfg, previews=False, profile=prof))   # one more run for the AR/tokenizer split
    return best, prof, first_preview


def time_eager(tok, ar, batch, cfg, reps):
    labels = torch.arange(batch) % ar.num_classes
    reference_sample(tok, ar, labels, cfg=cfg)
    best = float("inf")
    for _ in range(reps):
        sync(ar.device)
        t0 = time.perf_counter()
        reference_sample(tok, ar, labels, cfg=cfg)
        sync(ar.device)
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    p = common_args(__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["D-AR-L", "D-AR-XL", "D-AR-XXL"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--eager-batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    device = resolve_device(args.device)
    info = device_info(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.smoke:
        tok_cfg, models = smoke_configs()
        batches, eager_batches, reps = [1, 4], [1, 4], 1
    else:
        tok_cfg = tokenizer_config("tokenizer_v1")
        tok_cfg.repa_head = False
        models = {name: ar_config(name) for name in args.presets}
        batches, eager_batches, reps = args.batches, args.eager_batches, args.reps
    copy_gbps = info.get("mem_bw_gbs_measured") or info.get("mem_bw_gbs") or 1.0
    tflops = info.get("bf16_tflops_measured") or info.get("bf16_tflops") or info.get("fp32_tflops") or 1.0
    rows = []
    for name, acfg in models.items():
        tok, ar = build(tok_cfg, acfg, device, dtype)
        pipe = Pipeline(tokenizer=tok, ar=ar)
        fl = floors(tok_cfg, acfg, copy_gbps, tflops)
        for B in batches:
            try:
                sec, prof, first = time_engine(pipe, B, args.cfg, reps)
            except torch.cuda.OutOfMemoryError:
                rows.append(dict(model=name, batch=B, engine="fast", error="out of memory"))
                continue
            ips = B / sec
            rec = dict(model=name, batch=B, engine="fast", images_per_s=ips, ms=sec * 1e3,
                       ar_ms=prof.get("ar", 0) * 1e3, tokenizer_ms=prof.get("tokenizer", 0) * 1e3,
                       flop_floor_images_per_s=fl["flop_floor_images_per_s"],
                       fraction_of_flop_floor=ips / fl["flop_floor_images_per_s"],
                       achieved_tflops=ips * image_flops(tok_cfg, acfg) / 1e12)
            if B == 1:
                ar_floor = fl["ar_weight_read_floor_ms"]
                rec.update(first_preview_ms=first * 1e3 if first else None, ar_weight_read_floor_ms=ar_floor,
                           ar_vs_floor=rec["ar_ms"] / ar_floor,
                           ar_GBps=acfg.block_size * ar_weight_bytes(acfg) / max(prof.get("ar", 1e-9), 1e-9) / 1e9)
            rows.append(rec)
            print_row(rec)
            if B in eager_batches:
                esec = time_eager(tok, ar, B, args.cfg, max(1, reps - 1))
                erec = dict(model=name, batch=B, engine="eager", images_per_s=B / esec, ms=esec * 1e3,
                            speedup_of_fast=esec / sec)
                rows.append(erec)
                print_row(erec)
        del tok, ar, pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = args.out or default_out("sampling", device, args.smoke)
    write_results(out, "sampling", rows, device, smoke=args.smoke,
                  extra={"tokenizer": "smoke" if args.smoke else "tokenizer_v1", "cfg": args.cfg})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
