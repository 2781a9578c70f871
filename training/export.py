"""`dar-fast export RUN_DIR`: the exported weights (final.safetensors) from any training checkpoint.

Training writes ``final.safetensors`` once, after its last checkpoint. A run killed in between (or one whose
disk filled during the export) still has everything in ``checkpoint.pt``: this command (and ``--resume`` at the
final step) writes the same file from it, with the EMA weights by default (as training does) or the raw ones.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Tuple

from dar_fast.errors import UsageError
from dar_fast.training import checkpointing as ckpt_io

FINAL_NAME = "final.safetensors"


def register(sub):
    p = sub.add_parser("export", help="write final.safetensors from a training checkpoint",
                       description="Write the exported model (what training writes at its end: dar_fast.load_"
                                   "tokenizer / load_ar open it) from RUN_DIR/checkpoint.pt or a checkpoint file.")
    p.add_argument("run", metavar="RUN_DIR", help="training run directory (or a checkpoint.pt file)")
    p.add_argument("--weights", choices=["auto", "ema", "model"], default="auto",
                   help="ema: the EMA weights; model: the raw trained weights; auto (default): EMA when the run "
                        "kept one, as training exports")
    p.add_argument("--out", default=None, help=f"output .safetensors (default RUN_DIR/{FINAL_NAME})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=run)


def run(args) -> int:
    out, step, which = export_run(args.run, weights=args.weights, out=args.out, overwrite=args.overwrite)
    print(f"wrote {out} ({which} weights of step {step})", file=sys.stderr)
    return 0


def model_weights(ck: dict, weights: str = "auto") -> Tuple[dict, Optional[dict], str]:
    """A loaded training checkpoint -> (the model's state dict, the EMA by parameter name or None, "ema" or
    "model")."""
    sd = {k[len("model."):]: v for k, v in ck["model"].items() if k.startswith("model.")}
    ema = ck.get("ema")
    if weights == "ema" and not ema:
        raise UsageError("this run kept no EMA (--ema 0): use --weights model")
    if weights == "model" or not ema:
        return sd, None, "model"
    return sd, ema, "ema"


def build_model(kind: str, model_config: dict, sd: dict, ema: Optional[dict] = None):
    """The model of `kind` built from its config dict, `sd` loaded strictly, and the EMA weights (by parameter
    name: a state dict may store a parameter under other keys, e.g. the AR's merged w13 as w1/w3) put in place
    of the parameters. Training's own export goes through here too."""
    import torch

    from dar_fast.config import ar_config, tokenizer_config
    from dar_fast.models import ARModel, Tokenizer
    if kind == "tokenizer":
        model = Tokenizer(tokenizer_config(dict(model_config)))
    elif kind == "ar":
        model = ARModel(ar_config(dict(model_config)))
    else:
        raise UsageError(f"unknown checkpoint kind {kind!r}")
    model.load_state_dict(sd, strict=True)
    if ema:
        params = dict(model.named_parameters())
        missing = [n for n in ema if n not in params]
        if missing:
            raise UsageError(f"checkpoint EMA names parameters the model lacks: {missing[:6]}")
        with torch.no_grad():
            for n, t in ema.items():
                params[n].copy_(t.to(params[n].dtype))
    return model


def save_model(model, path: str) -> None:
    """Write a tokenizer or AR model as our safetensors (config inside)."""
    from dar_fast.api import save_ar, save_tokenizer
    from dar_fast.models import ARModel
    (save_ar if isinstance(model, ARModel) else save_tokenizer)(model, path)


def export_run(run: str, weights: str = "auto", out: Optional[str] = None,
               overwrite: bool = False) -> Tuple[str, int, str]:
    """RUN_DIR (or checkpoint file) -> (path written, step, weights used)."""
    path = os.path.join(run, ckpt_io.CHECKPOINT_NAME) if os.path.isdir(run) else run
    if not os.path.exists(path):
        raise UsageError(f"no training checkpoint at {path}")
    out = out or os.path.join(os.path.dirname(os.path.abspath(path)), FINAL_NAME)
    if os.path.exists(out) and not overwrite:
        raise UsageError(f"{out} already exists; pass --overwrite to replace it (or --out elsewhere)")
    try:
        ck = ckpt_io.load_checkpoint(path)
    except ValueError as e:
        raise UsageError(str(e)) from None
    model_config = (ck.get("fingerprint") or {}).get("model")
    if not isinstance(model_config, dict):
        raise UsageError(f"{path} records no model config")
    sd, ema, which = model_weights(ck, weights)
    save_model(build_model(ck.get("kind"), model_config, sd, ema), out)
    return out, int(ck.get("step", 0)), which
