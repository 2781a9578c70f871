"""Public loading API: `load_tokenizer` and `load_ar`."""
from __future__ import annotations

import dataclasses

import torch

from dar_fast.checkpoint import (AR_ORDER, TOKENIZER_ORDER, CheckpointMismatch, load_strict, read_checkpoint_set,
                                 save_safetensors)
from dar_fast.defaults import PRECISIONS, model_defaults
from dar_fast.errors import UsageError
from dar_fast.config import ARConfig, TokenizerConfig, ar_config, tokenizer_config
from dar_fast.models import ARModel, Tokenizer


def _released_ar_config(cfg):
    """A LlamaGen-style `args` Namespace/dict (gpt_model='GPT-L', ...) -> AR config dict, else pass through."""
    if isinstance(cfg, dict) or hasattr(cfg, "__dict__"):
        d = cfg if isinstance(cfg, dict) else vars(cfg)
        name = d.get("gpt_model") or d.get("ar_model")
        if isinstance(name, str):
            c = ar_config(name)
            for k in ("vocab_size", "num_classes", "cls_token_num"):
                if k in d and d[k] is not None:
                    setattr(c, k, int(d[k]))
            if d.get("codebook_size"):
                c.vocab_size = int(d["codebook_size"])
            return c
    return cfg


def load_tokenizer(ckpt, config=None, device="cpu", dtype=torch.float32, weights=None) -> Tokenizer:
    """Tokenizer from a released `.pt`, our `.safetensors`, or a state dict.

    config: None (from the checkpoint), a preset name, a released-format dict, or a JSON/YAML path
    (a given config wins over the checkpoint's).
    weights: "ema" or "model" picks that set of a released file; None follows the released loader
    (`ema` when present, else `model`). `model.loaded_weights` says which set was loaded.
    A checkpoint without the training-only REPA head loads for inference (the head is dropped).
    """
    sd, ck_cfg, kind, which = read_checkpoint_set(ckpt, weights, TOKENIZER_ORDER)
    if kind not in (None, "tokenizer"):
        raise ValueError(f"{ckpt}: this is a {kind} checkpoint, not a tokenizer")
    cfg = config if config is not None else ck_cfg
    if cfg is None:
        raise ValueError(f"{ckpt if isinstance(ckpt, str) else 'state dict'}: no config inside or beside the checkpoint; "
                         "pass config= (a preset such as 'tokenizer_v1', a dict, or a JSON/YAML path)")
    has_repa = any(k.startswith("diff_decoder.net.repa_out.") for k in sd)
    cfg = dataclasses.replace(tokenizer_config(cfg), repa_head=has_repa)
    with torch.device("meta"):
        model = Tokenizer(cfg)
    model = model.to_empty(device="cpu")
    if cfg.vq_enable:
        model.quantize.codebook_used.zero_()
    load_strict(model, sd, what="tokenizer")
    model.loaded_weights = which
    model.sampling = model_defaults(ckpt, config, ck_cfg)     # recommended sampling settings it carries (if any)
    return model.to(device=device, dtype=dtype).eval()


def load_ar(ckpt, config=None, device="cpu", dtype=torch.float32, weights=None) -> ARModel:
    """AR model from a released `.pt`, our `.safetensors`, or a state dict; config: preset name or released-key dict.

    weights: "ema" or "model"; None follows the released sample scripts (`model`, else `module`, else
    `state_dict`, else an `ema`-only file's `ema`). `model.loaded_weights` says which set was loaded."""
    sd, ck_cfg, kind, which = read_checkpoint_set(ckpt, weights, AR_ORDER)
    if kind not in (None, "ar"):
        raise ValueError(f"{ckpt}: this is a {kind} checkpoint, not an AR model")
    cfg = config if config is not None else _released_ar_config(ck_cfg)
    if cfg is None:
        raise ValueError(f"{ckpt if isinstance(ckpt, str) else 'state dict'}: no config inside or beside the checkpoint; "
                         "pass config= (a preset such as 'D-AR-L' or a dict of the released keys)")
    cfg = ar_config(cfg)
    with torch.device("meta"):
        model = ARModel(cfg)
    model = model.to_empty(device="cpu")
    load_strict(model, sd, optional_prefixes=(), what="AR")
    model.loaded_weights = which
    model.sampling = model_defaults(ckpt, config, ck_cfg)     # e.g. the paper's cfg schedule of a D-AR preset
    return model.to(device=device, dtype=dtype).eval()


def resolve_precision(precision, device, dtype=None):
    """-> (tokenizer dtype, AR dtype, tf32) for a precision mode.

    "released": what the released FID script runs: the AR in bfloat16, the tokenizer in float32 with
        TF32 matmuls (on CUDA). "fast": bfloat16 throughout. None: `dtype` for both (default bfloat16
        on CUDA, float32 on CPU). On CPU both modes run float32 (no TF32 there) unless dtype is given;
        a given dtype is used for both models. The diffusion ODE is float32 in every mode."""
    device = torch.device(device)
    if precision is not None and precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if dtype is not None:
        return dtype, dtype, precision == "released" and device.type == "cuda"
    if device.type != "cuda":
        return torch.float32, torch.float32, False
    if precision == "released":
        return torch.float32, torch.bfloat16, True
    return torch.bfloat16, torch.bfloat16, False


def precision_record(precision, tok_dtype, ar_dtype, tf32) -> dict:
    """What a run used, for manifests and `Pipeline.precision`."""
    return dict(mode=precision, tokenizer_dtype=str(tok_dtype).replace("torch.", ""),
                ar_dtype=str(ar_dtype).replace("torch.", ""), tf32=bool(tf32))


def enable_tf32():
    """TF32 matmuls and convolutions, process-wide, as the released sampling scripts set them."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def save_tokenizer(tok: Tokenizer, path: str):
    save_safetensors(tok, path, tok.cfg.to_dict(), "tokenizer", sampling=getattr(tok, "sampling", None),
                     weights=getattr(tok, "loaded_weights", None))


def save_ar(ar: ARModel, path: str):
    save_safetensors(ar, path, ar.cfg.to_dict(), "ar", sampling=getattr(ar, "sampling", None),
                     weights=getattr(ar, "loaded_weights", None))


__all__ = ["load_tokenizer", "load_ar", "save_tokenizer", "save_ar", "CheckpointMismatch",
           "TokenizerConfig", "ARConfig"]
