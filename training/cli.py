"""`dar-fast train-tokenizer`, `dar-fast train-ar`, `dar-fast extract-codes`, `dar-fast export`.

Single process:   dar-fast train-ar --preset ar-tiny --codes codes/ --out runs/ar --steps 1000 --batch-size 64
Many processes:   torchrun --nproc_per_node=8 -m dar_fast.cli train-ar ...   (same flags; --batch-size is global)
"""
from __future__ import annotations

import argparse

from dar_fast.commands.common import positive_int
from dar_fast.config import AR_PRESETS, TOKENIZER_PRESETS


def _common(p: argparse.ArgumentParser, *, defaults: dict):
    p.add_argument("--out", required=True, help="run directory: metrics.jsonl, checkpoint.pt, final.safetensors")
    p.add_argument("--steps", type=int, required=True, help="train up to this many optimizer steps")
    p.add_argument("--batch-size", type=int, default=defaults["batch"],
                   help=f"GLOBAL batch size, split over ranks and --grad-accum (default {defaults['batch']})")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step on each rank (default 1)")
    p.add_argument("--log-every", type=int, default=1, help="write metrics every N steps (default 1)")
    p.add_argument("--ckpt-every", type=int, default=1000,
                   help="write <out>/checkpoint.pt every N steps (and always at the end); 0 = only at the end")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue the run in --out (or from CKPT) up to --steps, exactly")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, data order and augmentation")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {defaults['lr']})")
    p.add_argument("--warmup", type=int, default=None, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=None, help=f"AdamW weight decay (default {defaults['wd']})")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0 = off; default 1)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the exported weights (0 = off; default 0.999)")
    p.add_argument("--no-ema-warmup", action="store_true",
                   help="constant EMA decay from step 1 (the released recipe); default: min(decay, (1+t)/(10+t))")
    p.add_argument("--init", default=None, metavar="CKPT", help="start from these weights (fine-tuning)")
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing of the transformer blocks")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    p.add_argument("--strategy", default="auto", choices=["auto", "none", "ddp", "fsdp"],
                   help="distribution: DDP for small models, FSDP2 (fully_shard per block) for large (default auto)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--no-bf16", action="store_true", help="float32 on GPU instead of bf16 autocast")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is fastest for the tiny presets on a "
                        "busy machine)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def register(sub):
    # ---------------------------------------------------------------- tokenizer
    p = sub.add_parser("train-tokenizer", help="train a sequential diffusion tokenizer",
                       description="Train a sequential diffusion tokenizer: flow matching + VQ + LPIPS + REPA "
                                   "(paper eq. 7). Writes <out>/metrics.jsonl, <out>/checkpoint.pt and "
                                   "<out>/final.safetensors (EMA weights, dar_fast.load_tokenizer opens it).")
    p.add_argument("--preset", default="tokenizer_v1",
                   help=f"tokenizer preset or config file ({', '.join(sorted(TOKENIZER_PRESETS))}; default tokenizer_v1)")
    p.add_argument("--data", required=True,
                   help="ImageFolder directory, webdataset .tar shard(s), or 'digits' / 'digits:train'")
    p.add_argument("--loader", default="auto", choices=["auto", "dali", "torch", "memory"],
                   help="image loader: DALI, a torch DataLoader, or all in memory (auto: DALI if installed)")
    p.add_argument("--num-workers", type=int, default=4, help="decoding workers of the torch loader")
    p.add_argument("--augment", default=None, choices=["center", "random_crop_flip"],
                   help="default: random_crop_flip (released), center for digits")
    p.add_argument("--flip", action="store_true", default=None, help="random horizontal flips with --augment center")
    p.add_argument("--lpips-vgg", default=None, help="torchvision VGG16 weights (.pth) for LPIPS")
    p.add_argument("--lpips-lin", default=None, help="LPIPS linear-layer weights (.pth)")
    p.add_argument("--dinov2", default=None, help="DINOv2-B: local torch.hub directory or state dict, for REPA")
    p.add_argument("--lpips-weight", type=float, default=None,
                   help="LPIPS weight (default 0.5; 0 for the tiny/digits presets)")
    p.add_argument("--repa-weight", type=float, default=None,
                   help="REPA weight (default 0.5; 0 for the tiny/digits presets)")
    _common(p, defaults=dict(batch=512, lr=2e-4, wd=0.0))
    p.set_defaults(func=run_train_tokenizer)

    # ---------------------------------------------------------------- AR
    p = sub.add_parser("train-ar", help="train the AR model on extracted codes",
                       description="Train the class-conditional Llama on codes from `dar-fast extract-codes`. "
                                   "Writes <out>/metrics.jsonl, <out>/checkpoint.pt and <out>/final.safetensors "
                                   "(EMA weights, dar_fast.load_ar opens it).")
    p.add_argument("--preset", default="D-AR-L", help=f"AR preset or config file ({', '.join(sorted(AR_PRESETS))})")
    p.add_argument("--codes", required=True, help="directory written by dar-fast extract-codes")
    p.add_argument("--class-dropout", type=float, default=None,
                   help="null-class probability for CFG (default: the config's class_dropout_prob, 0.1 as released)")
    p.add_argument("--lr-decay-frac", type=float, default=1 / 6,
                   help="linear decay to --lr-final over this last fraction of the steps (default 1/6; 0 = none)")
    p.add_argument("--lr-final", type=float, default=1e-5, help="learning rate at the end of the decay (default 1e-5)")
    _common(p, defaults=dict(batch=256, lr=4e-4, wd=0.05))
    p.set_defaults(func=run_train_ar)

    # ---------------------------------------------------------------- codes
    p = sub.add_parser("extract-codes", help="tokenize a data set once into memory-mapped codes",
                       description="Encode every image (centre crop, optionally also its mirror) with a tokenizer "
                                   "into <out>/codes.npy (+ labels.npy, meta.json), sharded over torchrun ranks.")
    p.add_argument("--tokenizer", required=True, help="tokenizer checkpoint (.safetensors or released .pt)")
    p.add_argument("--data", required=True, help="ImageFolder directory, .tar shard(s), or 'digits'")
    p.add_argument("--out", required=True, help="output folder for codes.npy, labels.npy and meta.json")
    p.add_argument("--loader", default="auto", choices=["auto", "dali", "torch", "memory"],
                   help="image loader: DALI, a torch DataLoader, or all in memory (auto: DALI if installed)")
    p.add_argument("--flip", action="store_true", help="also encode the horizontal mirror of every image")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call on each rank")
    p.add_argument("--num-workers", type=int, default=4, help="decoding workers of the torch loader (default 4)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--overwrite", action="store_true", help="replace codes already in --out")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run_extract_codes)

    # ---------------------------------------------------------------- export (final.safetensors from a checkpoint)
    from dar_fast.training.export import register as register_export
    register_export(sub)


# Bad input raises dar_fast.errors.UsageError (or a missing file's OSError) from where it is found; the main CLI
# prints those in one line and lets every other exception show its traceback. --threads is applied there too.

def run_train_tokenizer(args) -> int:
    from dar_fast.training.tokenizer_train import train_tokenizer
    train_tokenizer(args)
    return 0


def run_train_ar(args) -> int:
    from dar_fast.training.ar_train import train_ar
    train_ar(args)
    return 0


def run_extract_codes(args) -> int:
    from dar_fast.training.extract_codes import extract_codes
    extract_codes(args.tokenizer, args.data, args.out, loader=args.loader, flip=args.flip, batch_size=args.batch_size,
                  num_workers=args.num_workers, device=args.device, overwrite=args.overwrite, quiet=args.quiet)
    return 0
