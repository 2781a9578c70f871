"""Typed configs for the tokenizer and the AR model, in the released key layout, with named presets.

The field names are the released config keys, so a released config dict (the
"model" entry of a tokenizer config, the LlamaGen-style ModelArgs of an AR
checkpoint) maps onto these dataclasses one to one.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple, Union

from dar_fast.errors import UsageError

# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


@dataclass
class DiffDecoderConfig:
    """Pixel diffusion transformer (the tokenizer's decoder)."""
    in_dim: int = 3
    out_dim: int = 3
    dim: int = 768
    cond_dim: int = 768
    patch_size: int = 8
    depth: int = 12
    data_std: float = 0.6
    time_shift: float = 2.0
    mlp_head: bool = False              # released FinalLayer output head (needs share_time_encoding)
    share_time_encoding: bool = False   # one time embedder for all blocks instead of one per block
    # released key, training only: train-tokenizer turns it into activation checkpointing of the DiT blocks
    # (training/parallelize.py); the model itself ignores it
    grad_checkpointing: bool = False
    # REPA projection head sits before this block (training only); released default 8
    repa_layer: int = 8
    rope_base_len: float = 10000.0      # theta of the pixel DiT's 2D RoPE
    cfg: float = 1.0                    # released: read into the decoder but never used by its sampler
    repa_dim: int = 768          # DINOv2-B feature width
    repa_hidden: int = 2048
    repa_grid: int = 16          # tokens pooled to 16x16 before the head


def _positive(what: str, cfg, names, minimum: int = 1) -> None:
    """Sizes must be integers >= minimum (a 0 patch size or group count would load, then divide by zero)."""
    for n in names:
        v = getattr(cfg, n, None)
        if v is None:
            continue            # optional: derived later
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise UsageError(f"{what}: {n} must be {kind}, got {v!r}")


@dataclass
class TokenizerConfig:
    """Sequential diffusion tokenizer (released `tokenizer_v1` layout)."""
    encoder_patch_size: int = 16
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    query_low_rank: bool = True
    encoder_dim: int = 768
    decoder_dim: int = 768
    vq_dim: int = 8
    vq_codebook_size: int = 16384
    num_denoising_steps: int = 8
    num_query_groups: int = 8
    num_all_queries: int = 256
    queries_per_step: Optional[int] = 32   # None: num_all_queries // num_query_groups, as released
    vq_enable: bool = True       # False: the released "LNBottleneck" (l2-normalised continuous latents, no codes)
    sampling_resolution: Union[int, Tuple[int, int], None] = 256   # image size (H, W) or one int; released v1: 256
    # released: after a decode, if a side exceeds R, bicubic resize to R x R (0: never)
    output_resolution: int = 0
    rope_base_len: float = 10000.0   # theta of the encoder's 2D RoPE
    diff_decoder: DiffDecoderConfig = field(default_factory=DiffDecoderConfig)
    # ours
    head_dim: int = 64
    query_table_size: int = 1024   # rows of query_embedding / decoder_embedding in the released layout
    repa_head: bool = True         # build the training-only REPA head

    @property
    def image_size(self) -> Tuple[int, int]:
        s = 256 if self.sampling_resolution is None else self.sampling_resolution
        return (int(s), int(s)) if isinstance(s, (int, float)) else (int(s[0]), int(s[1]))

    @property
    def num_tokens(self) -> int:
        return self.num_all_queries

    @property
    def group_size(self) -> int:
        return self.queries_per_step

    def validate(self) -> "TokenizerConfig":
        _positive("tokenizer config", self, ("num_encoder_layers", "num_decoder_layers"), minimum=0)
        _positive("tokenizer config", self, ("encoder_patch_size", "encoder_dim", "decoder_dim", "vq_dim", "vq_codebook_size",
                                             "num_denoising_steps", "num_query_groups", "num_all_queries",
                                             "queries_per_step", "head_dim", "query_table_size"))
        _positive("tokenizer config: diff_decoder", self.diff_decoder, ("dim", "cond_dim", "patch_size", "depth"))
        if self.queries_per_step is None:
            self.queries_per_step = self.num_all_queries // max(self.num_query_groups, 1)
        if self.num_all_queries != self.num_query_groups * self.queries_per_step:
            raise UsageError(f"tokenizer config: queries_per_step={self.queries_per_step} with num_all_queries="
                             f"{self.num_all_queries} and num_query_groups={self.num_query_groups}: dar-fast needs "
                             "num_all_queries == num_query_groups x queries_per_step (groups that tile the tokens)")
        dd = self.diff_decoder
        for name, v in (("diff_decoder.in_dim", dd.in_dim), ("diff_decoder.out_dim", dd.out_dim)):
            if v != 3:
                raise UsageError(f"tokenizer config: {name}={v} is not supported: the released decoder is built "
                                 "for 3 (RGB) channels whatever it says")
        if dd.mlp_head and not dd.share_time_encoding:
            raise UsageError("tokenizer config: diff_decoder.mlp_head=true needs diff_decoder.share_time_encoding="
                             "true (the released head is modulated by the shared time embedding; without it the "
                             "released code fails)")
        if self.output_resolution < 0:
            raise UsageError(f"tokenizer config: output_resolution must be >= 0 (0: off), got {self.output_resolution}")
        if self.num_denoising_steps < 1:
            raise UsageError(f"tokenizer config: num_denoising_steps must be >= 1, got {self.num_denoising_steps}")
        if self.num_all_queries > self.query_table_size:
            self.query_table_size = self.num_all_queries
        H, W = self.image_size
        for name, p in (("encoder_patch_size", self.encoder_patch_size), ("diff_decoder.patch_size", self.diff_decoder.patch_size)):
            if H % p or W % p:
                raise UsageError(f"tokenizer config: image size {H}x{W} is not divisible by {name}={p}")
        for name, d in (("encoder_dim", self.encoder_dim), ("decoder_dim", self.decoder_dim), ("diff_decoder.dim", self.diff_decoder.dim)):
            if d % self.head_dim:
                raise UsageError(f"tokenizer config: {name}={d} is not a multiple of head_dim={self.head_dim}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# AR model
# ----------------------------------------------------------------------------------------------


@dataclass
class ARConfig:
    """LlamaGen-style class-conditional Llama (released GPT-B/L/XL/XXL layout)."""
    dim: int = 1024
    n_layer: int = 24
    n_head: int = 16
    n_kv_head: Optional[int] = None
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0
    num_classes: int = 1000
    caption_dim: int = 2048
    class_dropout_prob: float = 0.1
    model_type: str = "c2i"
    vocab_size: int = 16384
    cls_token_num: int = 1
    block_size: int = 256
    max_batch_size: int = 32
    max_seq_len: int = 2048

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ffn_hidden(self) -> int:
        # int(2 * 4 * dim / 3), times the optional multiplier, rounded up to a multiple of `multiple_of`
        h = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            h = int(self.ffn_dim_multiplier * h)
        m = self.multiple_of
        return m * ((h + m - 1) // m)

    def validate(self) -> "ARConfig":
        _positive("AR config", self, ("dim", "n_layer", "n_head", "n_kv_head", "multiple_of", "vocab_size",
                                      "block_size", "num_classes"))
        if self.dim % self.n_head:
            raise UsageError(f"AR config: dim={self.dim} not divisible by n_head={self.n_head}")
        if self.n_head % self.kv_heads:
            raise UsageError(f"AR config: n_head={self.n_head} not divisible by n_kv_head={self.kv_heads}")
        if self.class_dropout_prob <= 0:
            raise UsageError(f"AR config: class_dropout_prob={self.class_dropout_prob}: with 0 the released model has no "
                             "null-class row (no classifier-free guidance); dar-fast needs a value > 0 (released 0.1)")
        if self.model_type != "c2i" or self.cls_token_num != 1:
            raise UsageError(f"AR config: model_type={self.model_type!r}, cls_token_num={self.cls_token_num}: only "
                             "class-conditional models (model_type 'c2i', cls_token_num 1) are supported")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------

def _ar(dim, n_layer, n_head, **kw):
    return lambda: ARConfig(dim=dim, n_layer=n_layer, n_head=n_head, **kw)


TOKENIZER_PRESETS = {
    "tokenizer_v1": lambda: TokenizerConfig(sampling_resolution=256),
    # 32x32 images, 32 tokens in 4 groups: quick runs and the embedded digits model
    "tokenizer-tiny": lambda: TokenizerConfig(
        encoder_patch_size=4, num_encoder_layers=2, num_decoder_layers=1, encoder_dim=128, decoder_dim=128,
        vq_codebook_size=256, num_denoising_steps=4, num_query_groups=4, num_all_queries=32, queries_per_step=8,
        sampling_resolution=32, repa_head=False,
        diff_decoder=DiffDecoderConfig(dim=128, cond_dim=128, patch_size=4, depth=3, repa_layer=99)),
}
# the embedded default model: 32x32 digits whose information is an 8x8 grid. The encoder reads 8x8-pixel
# patches (16 tokens). The DiT needs 4x4 patches: a velocity network carries the noise of every pixel it
# is handed through its residual stream, and an 8x8x3 patch is 192 values, as wide as a 192-dim stream; with
# that patch the decoder left coloured speckle (mean R/G/B spread 22.7 on reconstructions of real digits,
# source 0). 4x4x3 = 48 values in a 128-dim stream: spread 2.5 after 1,000 steps (benchmarks/bench_digits.py).
TOKENIZER_PRESETS["digits"] = lambda: TokenizerConfig(
    encoder_patch_size=8, num_encoder_layers=2, num_decoder_layers=1, encoder_dim=128, decoder_dim=128,
    vq_codebook_size=256, num_denoising_steps=4, num_query_groups=4, num_all_queries=32, queries_per_step=8,
    sampling_resolution=32, repa_head=False,
    diff_decoder=DiffDecoderConfig(dim=128, cond_dim=128, patch_size=4, depth=3, repa_layer=99))

AR_PRESETS = {
    "D-AR-B": _ar(768, 12, 12),
    "D-AR-L": _ar(1024, 24, 16),
    "D-AR-XL": _ar(1280, 36, 20),
    "D-AR-XXL": _ar(1536, 48, 24),
    "ar-tiny": _ar(128, 3, 2, num_classes=10, vocab_size=256, block_size=32,
                   token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0),
}
AR_PRESETS["digits"] = AR_PRESETS["ar-tiny"]
# the released names of the same models
for _n in ("B", "L", "XL", "XXL"):
    AR_PRESETS[f"GPT-{_n}"] = AR_PRESETS[f"D-AR-{_n}"]


# ints that may be 0 (0 means "off"); every other int field is a size or count and must be >= 1
_ZERO_OK = {"output_resolution", "repa_layer"}
# floats that must be > 0; names ending in _p / _prob / _rate are probabilities in [0, 1]; other floats: finite
_POSITIVE_FLOATS = {"data_std", "time_shift", "norm_eps", "rope_base", "ffn_dim_multiplier", "initializer_range"}


def _type_name(hint) -> str:
    import typing
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) in (tuple, Tuple):
        return "[" + ", ".join(_type_name(a) for a in typing.get_args(hint)) + "]"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(hint, str(hint))


def _check_field(name: str, hint, v, what: str):
    """Type and range of one config value; the error names the field. Unknown annotations are not checked."""
    import math
    import typing
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Union:
        if v is None and type(None) in args:
            return v
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_field(name, a, v, what)
            except ValueError:
                continue
        want = " or ".join(_type_name(a) for a in args)
        raise UsageError(f"{what} config: {name} must be {want}, got {v!r}")
    if typing.get_origin(hint) in (tuple, Tuple):
        if not isinstance(v, (list, tuple)) or len(v) != len(args):
            raise UsageError(f"{what} config: {name} must be a list of {len(args)} values, got {v!r}")
        return tuple(_check_field(f"{name}[{i}]", a, x, what) for i, (a, x) in enumerate(zip(args, v)))
    if hint is bool:
        if not isinstance(v, bool):
            raise UsageError(f"{what} config: {name} must be true or false, got {v!r}")
    elif hint is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise UsageError(f"{what} config: {name} must be an integer, got {v!r}")
        if v < (0 if name in _ZERO_OK else 1):
            raise UsageError(f"{what} config: {name} must be {'>= 0' if name in _ZERO_OK else 'positive'}, got {v}")
    elif hint is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise UsageError(f"{what} config: {name} must be a finite number, got {v!r}")
        if name.endswith(("_p", "_prob", "_rate")) and not 0 <= v <= 1:
            raise UsageError(f"{what} config: {name} must be in [0, 1], got {v}")
        if name in _POSITIVE_FLOATS and v <= 0:
            raise UsageError(f"{what} config: {name} must be > 0, got {v}")
        v = float(v)
    elif hint is str:
        if not isinstance(v, str):
            raise UsageError(f"{what} config: {name} must be a string, got {v!r}")
    return v


def _from_dict(cls, d: dict, what: str):
    import typing
    if not isinstance(d, dict):
        raise UsageError(f"{what} config must be a mapping of keys to values, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise UsageError(f"{what} config: unknown keys {unknown}; known keys: {sorted(names)}")
    kw = dict(d)
    hints = typing.get_type_hints(cls)
    for k, v in d.items():
        hint = hints.get(k)
        if dataclasses.is_dataclass(hint):
            if isinstance(v, dict):
                kw[k] = _from_dict(hint, v, f"{what}.{k}")
            elif not isinstance(v, hint):
                raise UsageError(f"{what} config: {k} must be a mapping of {hint.__name__} keys, got {v!r}")
        elif hint is not None:
            kw[k] = _check_field(k, hint, v, what)
    return cls(**kw)


def _read_config_file(path: str) -> dict:
    """JSON or YAML file -> dict; a malformed file is reported with its name and the line of the problem."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise UsageError(f"config file {path} is not a text (JSON/YAML) file") from None
    except OSError as e:
        raise UsageError(f"cannot read config file {path}: {e.strerror or e}") from None
    if path.endswith((".yaml", ".yml")):
        import yaml
        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1} column {mark.column + 1}:" if mark is not None else ""
            raise UsageError(f"malformed YAML in {path}:{where} {getattr(e, 'problem', None) or e}") from None
    else:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"malformed JSON in {path}: line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(d, dict):
        raise UsageError(f"config file {path} must hold a mapping of keys to values, got "
                         f"{'nothing' if d is None else type(d).__name__}")
    return d


def _as_dict(obj) -> Any:
    """Namespace / OmegaConf-like / dict -> plain dict (recursively)."""
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, dict) and type(obj).__name__ == "Namespace":
        obj = vars(obj)
    if isinstance(obj, dict):
        return {k: _as_dict(v) for k, v in obj.items()}
    return obj


_TOK_KEYS = {f.name for f in dataclasses.fields(TokenizerConfig)}
_AR_KEYS = {f.name for f in dataclasses.fields(ARConfig)}


def _resolve(cfg, cls, presets: dict, keys: set, what: str, nested: str):
    """Preset name, `cls` instance, dict (optionally under "model" or `nested`), or JSON/YAML path -> validated `cls`."""
    if isinstance(cfg, cls):
        return cfg.validate()
    if isinstance(cfg, str):
        if cfg in presets:
            return presets[cfg]().validate()
        if not os.path.exists(cfg):
            raise ValueError(f"unknown {what} preset or config file {cfg!r}; presets: {sorted(presets)}")
        cfg = _read_config_file(cfg)
    cfg = _as_dict(cfg)
    if not isinstance(cfg, dict):
        raise TypeError(f"{what} config must be a preset name, dict or path, got {type(cfg).__name__}")
    if "model" in cfg and isinstance(cfg["model"], dict) and not (keys & set(cfg) - {"model"}):
        cfg = cfg["model"]
    elif nested in cfg and isinstance(cfg[nested], dict):
        cfg = cfg[nested]
    return _from_dict(cls, cfg, what).validate()


def tokenizer_config(cfg) -> TokenizerConfig:
    """Preset name, TokenizerConfig, dict (released format, optionally under "model"), or JSON/YAML path."""
    return _resolve(cfg, TokenizerConfig, TOKENIZER_PRESETS, _TOK_KEYS, "tokenizer", "tokenizer")


def ar_config(cfg) -> ARConfig:
    """Preset name, ARConfig, dict of the released keys (optionally under "model"), or JSON/YAML path."""
    return _resolve(cfg, ARConfig, AR_PRESETS, _AR_KEYS, "AR", "ar")
