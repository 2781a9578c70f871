"""`dar-fast convert`: a released `.pt` checkpoint -> our safetensors with the config inside and beside it."""
from __future__ import annotations

import os

import torch

from dar_fast.errors import UsageError
from dar_fast.io import write_json_atomic


def register(sub):
    p = sub.add_parser("convert", help="convert a released .pt checkpoint to safetensors + JSON config")
    p.add_argument("checkpoint", help="released .pt file (tokenizer or AR), or any checkpoint load_* opens")
    p.add_argument("out", help="output .safetensors path (a .json config is written beside it)")
    p.add_argument("--kind", choices=["tokenizer", "ar"], required=True, help="which model the checkpoint holds")
    p.add_argument("--config", default=None, help="preset name or JSON/YAML config when the checkpoint has none")
    p.add_argument("--weights", choices=["ema", "model"], default=None,
                   help="which weight set of a released file (default as released: tokenizer ema when present, AR model)")
    p.add_argument("--keep-repa", action="store_true", help="keep the training-only REPA head (tokenizer)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="storage dtype of the weights (loading casts to the dtype asked for)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=run)


def run(args) -> int:
    from dar_fast.api import load_ar, load_tokenizer, save_ar, save_tokenizer
    if not args.out.endswith(".safetensors"):
        raise UsageError(f"output must end in .safetensors, got {args.out}")
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(parent):
        raise UsageError(f"output folder {parent} does not exist")
    if os.path.isdir(args.out):
        raise UsageError(f"output {args.out} is a folder")
    if os.path.exists(args.out) and not args.overwrite:
        raise UsageError(f"output {args.out} exists; pass --overwrite to replace it")
    load = load_tokenizer if args.kind == "tokenizer" else load_ar
    try:
        model = load(args.checkpoint, config=args.config, dtype=getattr(torch, args.dtype),
                     weights=getattr(args, "weights", None))
    except ValueError as e:         # the checkpoint or config does not fit: the user's file, not a bug
        msg = str(e)
        raise UsageError(msg if args.checkpoint in msg else f"{args.checkpoint}: {msg}") from e
    if args.kind == "tokenizer":
        if not args.keep_repa and model.net.repa_out is not None:
            model.net.repa_out = None
            model.cfg.repa_head = False
        save_tokenizer(model, args.out)
    else:
        save_ar(model, args.out)
    side = args.out[: -len(".safetensors")] + ".json"
    side_cfg = {"kind": args.kind, "model": model.cfg.to_dict()}
    if getattr(model, "sampling", None):        # the model's recommended sampling settings travel with it
        side_cfg["sampling"] = model.sampling
    write_json_atomic(side, side_cfg)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out} ({n:,} parameters, {getattr(model, 'loaded_weights', 'model')} weights) and {side}")
    return 0
