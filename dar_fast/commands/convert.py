"""`dar-fast convert`: a released `.pt` checkpoint -> our safetensors with the config inside and beside it."""
from __future__ import annotations

import torch

from dar_fast.io import write_json_atomic


def register(sub):
    p = sub.add_parser("convert", help="convert a released .pt checkpoint to safetensors + JSON config")
    p.add_argument("checkpoint", help="released .pt file (tokenizer or AR), or any checkpoint load_* opens")
    p.add_argument("out", help="output .safetensors path (a .json config is written beside it)")
    p.add_argument("--kind", choices=["tokenizer", "ar"], required=True)
    p.add_argument("--config", default=None, help="preset name or JSON/YAML config when the checkpoint has none")
    p.add_argument("--keep-repa", action="store_true", help="keep the training-only REPA head (tokenizer)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="storage dtype of the weights (loading casts to the dtype asked for)")
    p.set_defaults(func=run)


def run(args) -> int:
    from dar_fast.api import load_ar, load_tokenizer, save_ar, save_tokenizer
    if not args.out.endswith(".safetensors"):
        raise ValueError(f"output must end in .safetensors, got {args.out}")
    if args.kind == "tokenizer":
        model = load_tokenizer(args.checkpoint, config=args.config, dtype=getattr(torch, args.dtype))
        if not args.keep_repa and model.net.repa_out is not None:
            model.net.repa_out = None
            model.cfg.repa_head = False
        save_tokenizer(model, args.out)
    else:
        model = load_ar(args.checkpoint, config=args.config, dtype=getattr(torch, args.dtype))
        save_ar(model, args.out)
    side = args.out[: -len(".safetensors")] + ".json"
    write_json_atomic(side, {"kind": args.kind, "model": model.cfg.to_dict()})
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out} ({n:,} parameters) and {side}")
    return 0
