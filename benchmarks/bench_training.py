"""Training throughput and MFU per preset: one full optimizer step (forward, backward, clip, AdamW, EMA).

What is timed is the trainers' own step (the objective module from training/losses.py, the optimizer and EMA
the trainers build) on synthetic data already on the device, one process: it excludes data loading and, for
the tokenizer, the frozen LPIPS / DINOv2 networks (no weights here; with them the step costs more and MFU is
lower). bf16 autocast on GPU, float32 on CPU.

FLOPs are analytic, 2 per multiply-add:
  AR         6 x (matmul parameters: blocks + output head) x tokens, plus attention 12 x layers x dim x T
             per token (scores and values, fwd + bwd, the full T x T square as PaLM counts it); 8 instead of
             6 with activation checkpointing.
  tokenizer  3 x forward (forward + backward) of the encoder, the causal decoder layers and one pixel-DiT
             call, counting every Linear (q/k/v/proj, MLP, per-token adaLN 6D, cross-attention q/proj on pixel
             tokens, k/v on the group's condition tokens) and attention over the pairs the masks allow
             (training/tokenizer_train.py: tokenizer_forward_flops); + one DiT forward with checkpointing.
MFU = FLOPs / time / dense bf16 peak of the device (GPU only: on CPU the achieved TFLOP/s are reported).

    python benchmarks/bench_training.py                         # GPU: tokenizer_v1, tiny, D-AR-B/L/XL
    python benchmarks/bench_training.py --smoke --device cpu    # CI: the tiny presets, few steps
    python benchmarks/bench_training.py --device cpu --cases tokenizer:digits:64 ar:digits:64
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import bench, common_args, default_out, device_info, resolve_device, write_results  # noqa: E402

from dar_fast.config import ar_config, tokenizer_config  # noqa: E402
from dar_fast.models import ARModel, Tokenizer  # noqa: E402
from dar_fast.training.ar_train import ar_train_flops  # noqa: E402
from dar_fast.training.distributed import DistEnv, peak_flops  # noqa: E402
from dar_fast.training.loop import EMA  # noqa: E402
from dar_fast.training.parallelize import parallelize  # noqa: E402
from dar_fast.training.losses import ARObjective, TokenizerObjective  # noqa: E402
from dar_fast.training.tokenizer_train import tokenizer_train_flops  # noqa: E402

# kind:preset:per-device batch
GPU_CASES = ["tokenizer:tokenizer-tiny:256", "tokenizer:tokenizer_v1:32", "ar:ar-tiny:256", "ar:D-AR-B:64",
             "ar:D-AR-L:64", "ar:D-AR-XL:32"]
CPU_CASES = ["tokenizer:digits:64", "ar:digits:64"]
SMOKE_CASES = ["tokenizer:tokenizer-tiny:4", "ar:ar-tiny:4"]


def build_step(kind: str, preset: str, batch: int, device, grad_ckpt: bool, compile_: bool):
    """(step fn, flops per step, units per step, unit name, params) for one case."""
    amp = device.type == "cuda"
    g = torch.Generator(device=device).manual_seed(0)
    torch.manual_seed(0)
    if kind == "tokenizer":
        cfg = tokenizer_config(preset)
        model = Tokenizer(cfg).initialize_weights()
        if model.net.repa_out is not None:
            model.net.repa_out.requires_grad_(False)
        obj = TokenizerObjective(model).to(device).train()
        compute = [model.net.blocks]                     # as train-tokenizer: the DiT blocks
        S = cfg.image_size[0]
        images = torch.rand(batch, 3, S, S, generator=g, device=device) * 2 - 1

        def inputs():
            return (images, torch.randn(images.shape, generator=g, device=device),
                    torch.rand(batch, generator=g, device=device))
        flops = tokenizer_train_flops(cfg, batch, grad_checkpointing=grad_ckpt)
        units, unit = float(batch), "images_per_s"
        groups = [{"params": [p for p in obj.parameters() if p.requires_grad], "weight_decay": 0.0}]
        lr = 2e-4
    else:
        cfg = ar_config(preset)
        model = ARModel(cfg).initialize_weights()
        obj = ARObjective(model).to(device).train()
        compute = [model.layers]
        codes = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), generator=g, device=device)
        labels = torch.randint(0, cfg.num_classes, (batch,), generator=g, device=device)

        def inputs():
            return codes, labels
        flops = ar_train_flops(cfg, batch, grad_checkpointing=grad_ckpt)
        units, unit = float(batch * cfg.block_size), "tokens_per_s"
        ps = [p for p in obj.parameters() if p.requires_grad]
        groups = [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": 0.05},
                  {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}]
        lr = 4e-4
    parallelize(obj, DistEnv(device=device), compute_blocks=compute, activation_checkpointing=grad_ckpt,
                compile=compile_, strategy="none")
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), **({"fused": True} if amp else {}))
    ema = EMA(list(model.named_parameters()), 0.999)
    params = [p for g_ in groups for p in g_["params"]]
    state = {"step": 0}

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = obj(*inputs())["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        ema.update(state["step"])
    n_params = sum(p.numel() for p in model.parameters())
    return step, flops, units, unit, n_params


def main():
    p = common_args(__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=None, help="kind:preset:batch entries (kind = tokenizer | ar)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    info = device_info(device)
    cases = args.cases or (SMOKE_CASES if args.smoke else GPU_CASES if device.type == "cuda" else CPU_CASES)
    rep_ms = args.rep_ms or (200.0 if device.type == "cuda" else (50.0 if args.smoke else 3000.0))
    max_iters = 3 if args.smoke else None
    peak = peak_flops(device)
    rows = []
    for case in cases:
        kind, preset, batch = case.split(":")
        batch = int(batch)
        try:
            step, flops, units, unit, n_params = build_step(kind, preset, batch, device, args.grad_checkpointing,
                                                            args.compile)
            step()                                         # warm-up (allocations, compilation)
            t = bench(step, device, warmup_ms=rep_ms / 4, rep_ms=rep_ms, max_iters=max_iters)
        except torch.OutOfMemoryError as e:
            print(f"{case}: out of memory ({str(e).splitlines()[0]})", flush=True)
            rows.append(dict(case=case, kind=kind, preset=preset, batch=batch, error="out of memory"))
            continue
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        s = t["ms"] / 1e3
        rec = dict(case=case, kind=kind, preset=preset, batch=batch, params=n_params,
                   grad_checkpointing=args.grad_checkpointing, compile=args.compile,
                   ms=t["ms"], ms_p20=t["ms_p20"], ms_p80=t["ms_p80"], method=t["method"],
                   flops_per_step=flops, tflops=flops / s / 1e12, **{unit: units / s})
        if peak:
            rec["mfu"] = flops / s / peak
        rows.append(rec)
        rate = f"{units / s:,.0f} {'img' if unit == 'images_per_s' else 'tok'}/s"
        mfu = f"  MFU {100 * rec['mfu']:.1f}%" if "mfu" in rec else ""
        print(f"{case:<30} {n_params / 1e6:8.1f}M  {t['ms']:9.1f} ms/step  {rate:>16}  "
              f"{rec['tflops']:7.3f} TFLOP/s{mfu}", flush=True)
    out = args.out or default_out("training", device, args.smoke)
    write_results(out, "training", rows, device, smoke=args.smoke,
                  extra=dict(peak_bf16_flops=peak, device_info=info,
                             notes="one optimizer step on synthetic device-resident data; frozen LPIPS/DINOv2 "
                                   "and data loading excluded; FLOPs analytic (see the module docstring)"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
