"""Recommended sampling settings that travel with a model.

A checkpoint (safetensors metadata `dar_fast_sampling`, or a `"sampling"` entry
in the JSON config beside it or passed as `config=`) and a preset may carry the
settings its authors validated:

    {"cfg": 2.0 | [start, end], "temperature": 1.0, "top_k": 0, "top_p": 1.0, "steps": 8, "solver": "adams2"}

`Pipeline.sample/stream` and the `sample`/`fid` commands use them for every
setting the caller leaves out, then fall back to `LIBRARY_DEFAULTS`, and report
which values were used and where each came from.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, Optional, Tuple

from dar_fast.errors import UsageError

SAMPLING_KEY = "dar_fast_sampling"       # safetensors metadata entry (JSON)
KEYS = ("cfg", "temperature", "top_k", "top_p", "steps", "solver")
SOLVERS = ("adams2", "euler")
# arithmetic modes of sampling (dar_fast.api.resolve_precision says what each runs in)
PRECISIONS = ("released", "fast")
# used when neither the caller nor the model says otherwise; cfg 4.0 is LlamaGen's sample script default
LIBRARY_DEFAULTS = {"cfg": 4.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0}

# The paper's FID settings (released README and paper Table 1): linear CFG schedules, temperature 1,
# no top-k / top-p; the tokenizer's own number of diffusion steps (8) with the released solver.
_PAPER = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
PRESET_SAMPLING = {
    "D-AR-L": {"cfg": [1.1, 8.0], **_PAPER},
    "D-AR-XL": {"cfg": [1.1, 10.0], **_PAPER},
    "D-AR-XXL": {"cfg": [1.1, 11.0], **_PAPER},
    # the embedded model: 94-95% of samples recognised at cfg 2.0, 67-75% at 4.0 (tests/test_digits_model.py)
    "digits": {"cfg": 2.0},
}
for _n in ("L", "XL", "XXL"):
    PRESET_SAMPLING[f"GPT-{_n}"] = PRESET_SAMPLING[f"D-AR-{_n}"]


def check(d, where: str) -> dict:
    """Validate a sampling dict; every problem names the key and where it came from."""
    if not isinstance(d, dict):
        raise UsageError(f"{where}: 'sampling' must be a mapping, got {type(d).__name__}")
    unknown = sorted(set(d) - set(KEYS))
    if unknown:
        raise UsageError(f"{where}: unknown sampling setting(s) {unknown}; known: {list(KEYS)}")
    out = {}
    for k, v in d.items():
        if v is None:
            continue
        bad = UsageError(f"{where}: sampling.{k} = {v!r} is not valid")
        if k == "cfg":
            vals = v if isinstance(v, (list, tuple)) else [v]
            if len(vals) not in (1, 2) or not all(is_number(x) and math.isfinite(x) and x >= 0 for x in vals):
                raise UsageError(f"{where}: sampling.cfg must be a scale >= 0 or [start, end], got {v!r}")
            v = float(vals[0]) if len(vals) == 1 and not isinstance(v, (list, tuple)) else [float(x) for x in vals]
            if isinstance(v, list) and len(v) == 1:
                v = v[0]
        elif k == "temperature":
            if not (is_number(v) and math.isfinite(v) and v > 0):
                raise bad
            v = float(v)
        elif k == "top_p":
            if not (is_number(v) and 0 < v <= 1):
                raise bad
            v = float(v)
        elif k in ("top_k", "steps"):
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= (0 if k == "top_k" else 1)):
                raise bad
        elif k == "solver":
            if v not in SOLVERS:
                raise UsageError(f"{where}: sampling.solver must be one of {list(SOLVERS)}, got {v!r}")
        out[k] = v
    return out


def is_number(x) -> bool:
    """An int or float and not a bool (JSON `true` is no cfg value); the server's schema checks with it too."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _from_config(cfg, where: str) -> dict:
    """The sampling entry of a config given by the caller: a preset name, a dict, or a JSON/YAML path."""
    if cfg is None:
        return {}
    if isinstance(cfg, str):
        if cfg in PRESET_SAMPLING:
            return dict(PRESET_SAMPLING[cfg])
        if os.path.isfile(cfg):
            from dar_fast.config import _read_config_file
            cfg, where = _read_config_file(cfg), cfg
    if isinstance(cfg, dict):
        if "sampling" in cfg:
            return check(cfg["sampling"], where)
        for key in ("gpt_model", "ar_model"):       # a released args Namespace/dict names its preset
            if isinstance(cfg.get(key), str) and cfg[key] in PRESET_SAMPLING:
                return dict(PRESET_SAMPLING[cfg[key]])
    elif hasattr(cfg, "__dict__") and type(cfg).__name__ == "Namespace":
        return _from_config(vars(cfg), where)
    return {}


def _from_file(path: str) -> dict:
    """Settings stored with a checkpoint file: safetensors metadata, then the JSON config beside it."""
    out = {}
    if path.endswith(".safetensors") and os.path.isfile(path):
        try:
            from safetensors import safe_open
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
        except Exception:        # an unreadable file is reported by the loader, which runs first
            meta = {}
        if SAMPLING_KEY in meta:
            try:
                out.update(check(json.loads(meta[SAMPLING_KEY]), f"{path} (metadata {SAMPLING_KEY})"))
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}: metadata {SAMPLING_KEY} is not JSON ({e.msg})") from None
    side = os.path.splitext(path)[0] + ".json"
    if os.path.isfile(side) and side != path:
        try:
            with open(side) as fh:
                d = json.load(fh)
        except (OSError, json.JSONDecodeError):
            d = None      # the loader reports a broken config file when it reads it; a sidecar it ignores is no error
        if isinstance(d, dict) and "sampling" in d:
            out.update(check(d["sampling"], side))
    return out


def model_defaults(ckpt, config=None, ckpt_config=None) -> dict:
    """The recommended settings of a model being loaded: those its checkpoint carries (file, then its own
    config), overridden by those of the config the caller passed."""
    out = {}
    out.update(_from_config(ckpt_config, "checkpoint config"))
    if isinstance(ckpt, (str, os.PathLike)):
        out.update(_from_file(os.fspath(ckpt)))
    out.update(_from_config(config, "config"))
    return out


def resolve(model: Optional[dict], **given) -> Tuple[dict, Dict[str, str]]:
    """(values, source of each): the caller's non-None values, else the model's, else LIBRARY_DEFAULTS."""
    model = model or {}
    values, sources = {}, {}
    for k in KEYS:
        if given.get(k) is not None:
            values[k], sources[k] = given[k], "given"
        elif k in model:
            values[k], sources[k] = model[k], "model"
        elif k in LIBRARY_DEFAULTS:
            values[k], sources[k] = LIBRARY_DEFAULTS[k], "default"
    if isinstance(values.get("cfg"), list):
        values["cfg"] = tuple(values["cfg"])
    return values, sources


def describe(values: dict, sources: dict) -> str:
    """'cfg 1.1->8.0 (model), temperature 1.0 (default), ...' for logs."""
    parts = []
    for k, v in values.items():
        if k == "cfg" and isinstance(v, (tuple, list)):
            v = f"{v[0]:g}->{v[1]:g}"
        parts.append(f"{k} {v} ({sources.get(k, '?')})")
    return ", ".join(parts)
