"""Reading released `.pt` checkpoints in all their wrappers and our own safetensors, strictly.

Released files: the tokenizer file may hold `config` plus `ema` and/or `model`;
AR files hold `model`, `module` or `state_dict` (often beside an argparse
`args` Namespace), or are a bare state dict; keys may carry `_orig_mod.`
(torch.compile) or `module.` (DDP) prefixes. `torch.load(weights_only=True)`
refuses the Namespace since torch 2.6; we allow exactly that one class.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Tuple

import torch
import torch.nn as nn

from dar_fast.io import atomic_write

CONFIG_KEY = "dar_fast_config"   # safetensors metadata entry holding the JSON config
KIND_KEY = "dar_fast_kind"       # "tokenizer" or "ar"

# state-dict entries that are runtime buffers of the released code, never weights
_AR_DROP = ("kv_cache.k_cache", "kv_cache.v_cache", "freqs_cis", "causal_mask")
# may be absent: the training-only REPA head, the VQ usage statistics
OPTIONAL_PREFIXES = ("diff_decoder.net.repa_out.", "quantize.codebook_used")


class CheckpointMismatch(ValueError):
    """The state dict does not fit the model config; the message lists every offending key."""


def _torch_load(path: str):
    try:
        if hasattr(torch.serialization, "safe_globals"):
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
        torch.serialization.add_safe_globals([argparse.Namespace])   # torch 2.4
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise ValueError(f"{path}: refusing to unpickle it: it holds objects other than tensors, containers and "
                             f"argparse.Namespace ({str(e).splitlines()[0]}). Only load files you trust; dar-fast does not "
                             "execute pickled code.") from e
        raise


def _is_state_dict(d) -> bool:
    return isinstance(d, dict) and len(d) > 0 and all(isinstance(k, str) for k in d) and \
        any(torch.is_tensor(v) for v in d.values())


def unwrap(obj) -> Tuple[dict, Optional[object]]:
    """A loaded checkpoint object -> (state_dict, config-like or None)."""
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint is a {type(obj).__name__}, expected a dict / state dict")
    config = obj.get("config", None)
    if config is None and "args" in obj:
        config = obj["args"]
    for key in ("ema", "model", "module", "state_dict"):
        if key in obj and isinstance(obj[key], dict):
            inner = obj[key]
            # nested wrappers ({"model": {"module": sd}})
            if not _is_state_dict(inner):
                sd, cfg2 = unwrap(inner)
                return sd, config if config is not None else cfg2
            return inner, config
    if _is_state_dict(obj):
        return {k: v for k, v in obj.items() if torch.is_tensor(v)}, config
    raise ValueError(f"no state dict found in checkpoint (top-level keys: {sorted(obj)[:12]})")


def clean_keys(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        k = k.replace("_orig_mod.", "")
        if k.startswith("module."):
            k = k[len("module."):]
        if k.endswith(_AR_DROP):
            continue
        out[k] = v
    return out


def read_checkpoint(ckpt) -> Tuple[dict, Optional[object], Optional[str]]:
    """Path (.pt/.pth/.bin/.safetensors) or state dict -> (clean state dict, config or None, kind or None)."""
    kind = None
    if isinstance(ckpt, dict):
        sd, config = unwrap(ckpt)
        return clean_keys(sd), config, None
    path = os.fspath(ckpt)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    config = None
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        sd = load_file(path)
        if CONFIG_KEY in meta:
            config = json.loads(meta[CONFIG_KEY])
        kind = meta.get(KIND_KEY)
        if config is None:
            for side in (path[: -len(".safetensors")] + ".json", os.path.join(os.path.dirname(path), "config.json")):
                if os.path.exists(side):
                    with open(side) as fh:
                        config = json.load(fh)
                    break
    else:
        sd, config = unwrap(_torch_load(path))
    return clean_keys(sd), config, kind


def load_strict(model: nn.Module, sd: dict, optional_prefixes=OPTIONAL_PREFIXES, what: str = "model"):
    """load_state_dict that tolerates only the optional keys being absent and names every other problem."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.startswith(optional_prefixes)]
    unexpected = [k for k in sd if k not in own]
    misshaped = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or misshaped:
        def fmt(name, xs):
            return f"\n  {name} ({len(xs)}): " + ", ".join(xs[:20]) + (" ..." if len(xs) > 20 else "") if xs else ""
        raise CheckpointMismatch(f"checkpoint does not match the {what} config:" + fmt("missing", missing)
                                 + fmt("unexpected", unexpected) + fmt("mis-shaped", misshaped))
    model.load_state_dict(sd, strict=False)


def save_safetensors(model: nn.Module, path: str, config: dict, kind: str):
    """Weights + JSON config in the metadata, written atomically (temp file + rename)."""
    from safetensors.torch import save
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if not k.endswith(_AR_DROP)}
    data = save(sd, metadata={CONFIG_KEY: json.dumps(config), KIND_KEY: kind})
    atomic_write(path, lambda f: f.write(data))
