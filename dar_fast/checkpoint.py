"""Reading released `.pt` checkpoints in all their wrappers and our own safetensors, strictly.

Released files: the tokenizer file may hold `config` plus `ema` and/or `model`;
AR files hold `model`, `module` or `state_dict` (often beside an argparse
`args` Namespace), or are a bare state dict; keys may carry `_orig_mod.`
(torch.compile) or `module.` (DDP) prefixes. A `.pt` written by the released
tokenizer trainer holds {"model", "ema", "optimizer", "discriminator",
"optimizer_disc", "steps", "args": argparse.Namespace, "config":
config_util.Config}. We read every `.pt` with torch's restricted (weights_only)
unpickler, which builds tensors and containers only; on top of that we allow
exactly two classes: argparse.Namespace (a plain attribute bag) and
config_util.Config, mapped to `ReleasedConfig`, an inert mapping over the
pickled `_data` (config_util need not be importable, and none of its code
runs). Any other global in the file is refused before anything is built, so a
pickle that would run code never runs it.

Which weights: `weights="ema"|"model"` picks the set; the default follows the
released loaders: tokenizer `ema` when present (dar_tool.load_visual_tokenizer),
AR `model`, then `module`, then `state_dict` (the released sample scripts).
"""
from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Mapping
from typing import Optional, Tuple

import torch
import torch.nn as nn

from dar_fast.errors import UsageError
from dar_fast.io import atomic_write

CONFIG_KEY = "dar_fast_config"   # safetensors metadata entry holding the JSON config
KIND_KEY = "dar_fast_kind"       # "tokenizer" or "ar"
WEIGHTS_KEY = "dar_fast_weights"  # which set of a released file the weights are ("ema" / "model")

# state-dict entries that are runtime buffers of the released code, never weights
_AR_DROP = ("kv_cache.k_cache", "kv_cache.v_cache", "freqs_cis", "causal_mask")
# may be absent: the training-only REPA head, the VQ usage statistics
OPTIONAL_PREFIXES = ("diff_decoder.net.repa_out.", "quantize.codebook_used")


class CheckpointMismatch(UsageError):
    """The state dict does not fit the model config; the message lists every offending key."""


class ReleasedConfig(Mapping):
    """Inert stand-in for the released `config_util.Config`: a read-only mapping over its `_data`.

    The restricted unpickler creates it with `__new__` and hands it the pickled state; nothing else
    of the released class (YAML reading, merging) exists here."""

    def __init__(self, *args, **kwargs):   # never reads a file, whatever a pickle passes
        self._data = {}

    def __setstate__(self, state):
        data = state.get("_data", {}) if isinstance(state, dict) else {}
        self._data = dict(data) if isinstance(data, dict) else {}

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self):
        return len(self._data)


# the only classes a .pt may hold besides tensors and containers: global name -> what is built instead
RELEASED_CLASSES = {"argparse.Namespace": argparse.Namespace, "config_util.Config": ReleasedConfig}
WEIGHT_SETS = ("ema", "model")
# default search order of the wrapper keys (released loaders)
TOKENIZER_ORDER = ("ema", "model", "module", "state_dict")
AR_ORDER = ("model", "module", "state_dict", "ema")


def _plain(obj):
    """ReleasedConfig objects (at any depth of dicts/lists) -> plain dicts."""
    if isinstance(obj, ReleasedConfig):
        return {k: _plain(v) for k, v in obj._data.items()}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()} if any(isinstance(v, (ReleasedConfig, dict, list))
                                                             for v in obj.values()) else obj
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def _torch_load(path: str):
    try:
        if hasattr(torch.serialization, "safe_globals"):
            allowed = [argparse.Namespace, (ReleasedConfig, "config_util.Config")]
            with torch.serialization.safe_globals(allowed):
                return _plain(torch.load(path, map_location="cpu", weights_only=True))
        torch.serialization.add_safe_globals([argparse.Namespace])   # torch 2.4
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found:
            # torch's own message advises weights_only=False, i.e. running the file's code: never pass that on
            raise UsageError(f"{path}: refusing to unpickle it: it holds objects other than tensors, containers, "
                             f"argparse.Namespace and config_util.Config (a {found.group(1)}). dar-fast does not "
                             "execute pickled code; convert the weights to a plain state dict where the file was "
                             "made") from None
        raise _unreadable(path, "PyTorch", e) from None


_CKPT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def _unreadable(path: str, fmt: str, e: Exception) -> "UsageError":
    """A file that cannot be parsed: say it is truncated or corrupt, with the reader's own reason (minus any
    advice to unpickle with weights_only=False)."""
    detail = " ".join(str(e).split())
    for cut in ("This is an internal miniz error", "Weights only load failed", "In PyTorch 2.6"):
        detail = detail.split(cut)[0].strip().rstrip(".")
    if not detail or "weights_only" in detail:
        detail = type(e).__name__
    return UsageError(f"truncated or corrupt {fmt} file: {path} ({detail}; an interrupted download or copy?)")


def _sniff(path: str) -> str:
    """The checkpoint format from the first bytes: 'zip' (torch.save), 'pickle' (legacy torch.save),
    'safetensors', or '' (none of them)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"                       # pickle PROTO opcode, protocols 2-5
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path):
        return "safetensors"                  # u64 header length, then the JSON header
    return ""


def _check_file(path: str):
    """Refuse what is not a readable checkpoint file with one line that says what it is."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        inside = sorted(f for f in os.listdir(path) if f.endswith(_CKPT_SUFFIXES))
        hint = f"; it holds {', '.join(inside[:6])}{' ...' if len(inside) > 6 else ''}" if inside else ""
        raise UsageError(f"checkpoint {path} is a folder; give the checkpoint file{hint}")
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path} is not a regular file")
    if os.path.getsize(path) == 0:
        raise UsageError(f"empty checkpoint file (0 bytes; an interrupted download?): {path}")


def _read_safetensors(path: str):
    from safetensors import safe_open
    from safetensors.torch import load_file
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        sd = load_file(path)
    except Exception as e:  # SafetensorError (a Rust exception type), OSError
        raise _unreadable(path, "safetensors", e) from None
    return sd, meta


def _is_state_dict(d) -> bool:
    return isinstance(d, dict) and len(d) > 0 and all(isinstance(k, str) for k in d) and \
        any(torch.is_tensor(v) for v in d.values())


def unwrap(obj, weights: Optional[str] = None, order=TOKENIZER_ORDER) -> Tuple[dict, Optional[object]]:
    """A loaded checkpoint object -> (state_dict, config-like or None); see `unwrap_set`."""
    sd, config, _ = unwrap_set(obj, weights, order)
    return sd, config


def unwrap_set(obj, weights: Optional[str] = None, order=TOKENIZER_ORDER):
    """A loaded checkpoint object -> (state_dict, config-like or None, which set: "ema"/"model"/...).

    weights: None (the first wrapper key of `order` present), "ema" or "model" (that set, or an
    error listing what the file holds). A bare state dict is the "model" set."""
    if weights is not None and weights not in WEIGHT_SETS:
        raise UsageError(f"weights must be one of {list(WEIGHT_SETS)} (or None for the released default), got {weights!r}")
    if not isinstance(obj, dict):
        raise UsageError(f"checkpoint is a {type(obj).__name__}, expected a dict / state dict")
    config = obj.get("config", None)
    if config is None and "args" in obj:
        config = obj["args"]
    held = [k for k in order if k in obj and isinstance(obj[k], dict)]
    if weights is not None and held:
        if weights not in held:
            raise UsageError(f"the checkpoint has no {weights!r} weights; it holds {held}")
        held = [weights]
    for key in held:
        inner = obj[key]
        # nested wrappers ({"model": {"module": sd}})
        if not _is_state_dict(inner):
            sd, cfg2, _ = unwrap_set(inner, None, order)
            return sd, config if config is not None else cfg2, key
        return inner, config, key
    if _is_state_dict(obj):
        if weights not in (None, "model"):
            raise UsageError("the checkpoint is a bare state dict (one weight set, the model); "
                             f"it has no {weights!r} weights")
        return {k: v for k, v in obj.items() if torch.is_tensor(v)}, config, "model"
    raise UsageError(f"no state dict found in checkpoint (top-level keys: {sorted(obj)[:12]})")


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


def read_checkpoint(ckpt, weights: Optional[str] = None,
                    order=TOKENIZER_ORDER) -> Tuple[dict, Optional[object], Optional[str]]:
    """Path (.pt/.pth/.bin/.safetensors) or state dict -> (clean state dict, config or None, kind or None)."""
    sd, config, kind, _ = read_checkpoint_set(ckpt, weights, order)
    return sd, config, kind


def read_checkpoint_set(ckpt, weights: Optional[str] = None, order=TOKENIZER_ORDER):
    """As `read_checkpoint`, plus which weight set was read ("ema" / "model" / ...; a safetensors file
    records it in its metadata, else it is "model")."""
    kind = None
    if isinstance(ckpt, dict):
        sd, config, which = unwrap_set(_plain(ckpt), weights, order)
        return clean_keys(sd), config, None, which
    path = os.fspath(ckpt)
    _check_file(path)
    config = None
    fmt = _sniff(path)
    if path.endswith(".safetensors") or fmt == "safetensors":
        sd, meta = _read_safetensors(path)
        if CONFIG_KEY in meta:
            try:
                config = json.loads(meta[CONFIG_KEY])
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}: the config in its metadata is not JSON ({e.msg})") from None
        kind = meta.get(KIND_KEY)
        which = meta.get(WEIGHTS_KEY, "model")
        if weights is not None and weights != which:
            raise UsageError(f"{path} holds one weight set ({which!r}); it has no {weights!r} weights")
        if config is None:
            for side in (os.path.splitext(path)[0] + ".json", os.path.join(os.path.dirname(path), "config.json")):
                if os.path.exists(side):
                    from dar_fast.config import _read_config_file
                    config = _read_config_file(side)      # a malformed file is named with its line
                    break
    elif fmt in ("zip", "pickle"):
        try:
            sd, config, which = unwrap_set(_torch_load(path), weights, order)
        except UsageError as e:
            raise UsageError(f"{path}: {e}") from None
    else:
        with open(path, "rb") as f:
            head = f.read(8)
        raise UsageError(f"not a checkpoint: {path} is neither a PyTorch file (zip archive or pickle) nor "
                         f"safetensors (it starts with bytes {head.hex()})")
    return clean_keys(sd), config, kind, which


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
    check_weights(sd, own, what)
    model.load_state_dict(sd, strict=False)


def check_weights(sd: dict, own: dict, what: str = "model") -> None:
    """Refuse weights that would load silently wrong: a non-floating tensor where the model holds a floating one
    (int32 weights would be cast; bools become 0/1), and NaN or inf anywhere (they sample black images or one
    token). The finiteness check is one fused pass: the max-abs of every floating tensor at once
    (`_foreach_norm(inf)`: NaN and inf propagate), then a single host read; ~1 s per 3 GB on a CPU core (estimate: one streaming read at ~3 GB/s)."""
    bad_dtype = [f"{k} ({sd[k].dtype}, model {own[k].dtype})" for k in sd
                 if k in own and own[k].is_floating_point() and not sd[k].is_floating_point()]
    if bad_dtype:
        raise CheckpointMismatch(f"checkpoint holds non-floating weights where the {what} has floating ones: "
                                 + ", ".join(bad_dtype[:8]) + (" ..." if len(bad_dtype) > 8 else ""))
    names = [k for k, v in sd.items() if torch.is_tensor(v) and v.is_floating_point() and v.numel()]
    if not names:
        return
    peaks = torch.stack([m.float().cpu() for m in torch._foreach_norm([sd[k] for k in names], float("inf"))])
    bad = (~torch.isfinite(peaks)).nonzero().flatten().tolist()
    if bad:
        def kind(t):
            return "NaN" if torch.isnan(t).any() else "inf"
        listed = ", ".join(f"{names[i]} ({kind(sd[names[i]])})" for i in bad[:8])
        raise CheckpointMismatch(f"checkpoint has non-finite weights in {len(bad)} tensor(s): {listed}"
                                 + (" ..." if len(bad) > 8 else "") + "; the file is corrupt or the training diverged")


def save_safetensors(model: nn.Module, path: str, config: dict, kind: str, sampling: Optional[dict] = None,
                     weights: Optional[str] = None):
    """Weights + JSON config (and the recommended sampling settings, if any) in the metadata, written atomically."""
    from safetensors.torch import save

    from dar_fast.defaults import SAMPLING_KEY
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if not k.endswith(_AR_DROP)}
    meta = {CONFIG_KEY: json.dumps(config), KIND_KEY: kind}
    if weights:
        meta[WEIGHTS_KEY] = weights
    if sampling:
        meta[SAMPLING_KEY] = json.dumps(sampling)
    data = save(sd, metadata=meta)
    atomic_write(path, lambda f: f.write(data))
