"""Request checking for `dar-fast serve`: JSON bodies -> checked settings, or one line naming the problem.

Kept free of FastAPI so it is testable and importable without the serve extra.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
from typing import Optional

import torch

from dar_fast.defaults import LIBRARY_DEFAULTS, SOLVERS, is_number
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
GENERATE_KEYS = ("labels", "cfg", "seed", "sample_ids", "temperature", "top_k", "top_p", "steps", "solver",
                 "prefix_tokens")
MAX_IMAGE_BYTES = 8 << 20            # an upload larger than 8 MiB is not a layout reference
MAX_STEPS = 1000                     # one preview event per step: more than this is a mistake, not a setting


class BadRequest(ValueError):
    """The client's mistake: answered 4xx with {"error": str(e)}."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int64(v, name: str) -> int:
    if not _is_int(v):
        raise BadRequest(f"{name} must be an integer, got {v!r}")
    if not INT64_MIN <= v <= INT64_MAX:
        raise BadRequest(f"{name} must fit in int64, got {v}")
    return v


def _finite(v, name: str) -> float:
    if not is_number(v) or not math.isfinite(v):
        raise BadRequest(f"{name} must be a finite number, got {v!r}")
    return float(v)


def check_generate(body, *, num_classes: int, num_tokens: int, codebook_size: int, max_labels: int,
                   defaults: dict) -> dict:
    """A /v1/generate body -> {labels, cfg, seed, sample_ids, temperature, top_k, top_p, prefix, sources}."""
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(GENERATE_KEYS))
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown}; known: {list(GENERATE_KEYS)}")
    labels = body.get("labels")
    if not isinstance(labels, list) or not labels:
        raise BadRequest("labels must be a non-empty list of class ids")
    if len(labels) > max_labels:
        raise BadRequest(f"too many labels: {len(labels)} (at most {max_labels} per request: the smaller of "
                         "--max-batch and --max-queue)", 413)
    for c in labels:
        if not _is_int(c):
            raise BadRequest(f"labels must be integers, got {c!r}")
    bad = sorted({c for c in labels if not 0 <= c < num_classes})
    if bad:
        raise BadRequest(f"unknown class id(s) {bad[:8]}: this model has classes 0..{num_classes - 1}")
    B = len(labels)
    out, sources = {"labels": labels}, {}
    steps = body.get("steps")
    sources["steps"] = "given" if steps is not None else ("model" if defaults.get("steps") else "default")
    steps = steps if steps is not None else defaults.get("steps")
    if steps is not None and (not _is_int(steps) or not 1 <= steps <= MAX_STEPS):
        raise BadRequest(f"steps must be an integer in [1, {MAX_STEPS}] (diffusion steps), got {steps!r}")
    solver = body.get("solver")
    sources["solver"] = "given" if solver is not None else ("model" if defaults.get("solver") else "default")
    solver = solver if solver is not None else defaults.get("solver", "adams2")
    if solver not in SOLVERS:
        raise BadRequest(f"solver must be one of {list(SOLVERS)}, got {solver!r}")
    out["steps"], out["solver"] = steps, solver
    for k in ("cfg", "temperature", "top_k", "top_p"):
        given = body.get(k)
        sources[k] = "given" if given is not None else ("model" if k in defaults else "default")
        out[k] = given if given is not None else defaults.get(k, LIBRARY_DEFAULTS[k])
    cfg = out["cfg"]
    if isinstance(cfg, list):
        if len(cfg) != 2:
            raise BadRequest(f"cfg must be a number or [start, end], got {cfg!r}")
        cfg = [_finite(v, "cfg") for v in cfg]
        if min(cfg) < 0:
            raise BadRequest(f"cfg scales must be >= 0, got {cfg}")
    elif isinstance(cfg, tuple):
        cfg = [float(v) for v in cfg]
    else:
        cfg = _finite(cfg, "cfg")
        if cfg < 0:
            raise BadRequest(f"cfg must be >= 0, got {cfg}")
    out["cfg"] = cfg
    t = _finite(out["temperature"], "temperature")
    if t <= 0:
        raise BadRequest(f"temperature must be > 0, got {t}")
    out["temperature"] = t
    if not _is_int(out["top_k"]) or out["top_k"] < 0:
        raise BadRequest(f"top_k must be an integer >= 0 (0 = off), got {out['top_k']!r}")
    p = _finite(out["top_p"], "top_p")
    if not 0.0 < p <= 1.0:
        raise BadRequest(f"top_p must be in (0, 1], got {p}")
    out["top_p"] = p
    out["seed"] = _int64(body.get("seed", 0) if body.get("seed") is not None else 0, "seed")
    ids = body.get("sample_ids")
    if ids is None:
        ids = list(range(B))
    elif not isinstance(ids, list) or len(ids) != B:
        raise BadRequest(f"sample_ids must be a list of {B} integers (one per label)")
    out["sample_ids"] = [_int64(i, "sample_ids") for i in ids]
    out["prefix"] = check_prefix_tokens(body.get("prefix_tokens"), B, num_tokens, codebook_size)
    out["sources"] = sources
    return out


def check_prefix_tokens(prefix, B: int, num_tokens: int, codebook_size: int) -> Optional[torch.Tensor]:
    """[[int]] with 1 row (shared) or B rows of equal length <= N, codes in [0, V) -> (B,P) int64 or None."""
    if prefix is None:
        return None
    if not isinstance(prefix, list) or not prefix or not all(isinstance(r, list) for r in prefix):
        raise BadRequest("prefix_tokens must be a list of token lists ([[int, ...]]: one row, or one per label)")
    if len(prefix) not in (1, B):
        raise BadRequest(f"prefix_tokens has {len(prefix)} rows: give 1 (shared) or {B} (one per label)")
    P = len(prefix[0])
    if any(len(r) != P for r in prefix):
        raise BadRequest("prefix_tokens rows must all have the same length")
    if P > num_tokens:
        raise BadRequest(f"prefix_tokens has {P} tokens, more than the {num_tokens} an image has")
    for r in prefix:
        for v in r:
            if not _is_int(v) or not 0 <= v < codebook_size:
                raise BadRequest(f"prefix_tokens: {v!r} is not a token id in [0, {codebook_size})")
    if P == 0:
        return None
    t = torch.tensor(prefix, dtype=torch.int64)
    return t.expand(B, P).contiguous() if t.shape[0] == 1 else t


def check_encode(body, image_size) -> torch.Tensor:
    """{"image": base64 PNG/JPEG (a data: URL is fine)} -> (1,H,W,3) uint8, resized to the model's size."""
    from PIL import Image, UnidentifiedImageError
    if not isinstance(body, dict) or not isinstance(body.get("image"), str):
        raise BadRequest('the body must be {"image": "<base64 PNG or JPEG>"}')
    unknown = sorted(set(body) - {"image"})
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown}; known: ['image']")
    s = body["image"]
    if s.startswith("data:"):
        s = s.split(",", 1)[-1]
    if len(s) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise BadRequest(f"image larger than {MAX_IMAGE_BYTES >> 20} MiB", 413)
    try:
        raw = base64.b64decode(s, validate=True)
        img = Image.open(io.BytesIO(raw))
        img.load()
    except (binascii.Error, ValueError):
        raise BadRequest("image is not valid base64") from None
    except (UnidentifiedImageError, OSError):
        raise BadRequest("image is not a readable PNG/JPEG file") from None
    except Image.DecompressionBombError:
        raise BadRequest(f"image has too many pixels (more than {Image.MAX_IMAGE_PIXELS})", 413) from None
    img = img.convert("RGB")
    H, W = image_size
    if img.size != (W, H):
        # centre-crop to the model's aspect, then resize (bicubic): a layout reference, not a pixel copy
        w, h = img.size
        scale = min(w / W, h / H)
        cw, ch = round(W * scale), round(H * scale)
        left, top = (w - cw) // 2, (h - ch) // 2
        img = img.crop((left, top, left + cw, top + ch)).resize((W, H), Image.BICUBIC)
    import numpy as np
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())[None]


def png_base64(images: torch.Tensor) -> list:
    """(B,H,W,3) uint8 -> [base64 PNG]: lossless, so a client decodes the exact pixels."""
    from PIL import Image
    out = []
    for im in images.numpy():
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out
