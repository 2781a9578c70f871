"""The public sampling API: `Pipeline` (load, sample, stream, encode, decode).

The engine that runs a generation lives in `dar_fast.engine`; this module checks
arguments and hands them over.

Keys: sample i of a call with seed s uses (s, i) (or the ids the caller passes);
tokens come from `ops.sample_tokens` keyed by (seed, id, position) and the
initial noise from `seeding.sample_noise`, so a sample is the same alone or in
any batch, on any device, up to float rounding of the pixels.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from dar_fast import batching, engine, ops
from dar_fast.defaults import SOLVERS
from dar_fast.errors import UsageError
from dar_fast.engine import StreamStep  # noqa: F401  (StreamStep is public API)
from dar_fast.models import ARModel, Tokenizer
from dar_fast.sampling_args import (CFG, SampleOutput, cfg_schedule, check_compatible, check_labels, check_prefix,
                                    check_sampling_args)
from dar_fast.seeding import resolve_keys, sample_noise


def _default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


class Pipeline:
    """Tokenizer + AR model, sampling through the streaming engine.

    pipe = Pipeline(tokenizer=tok, ar=ar)                       # models as loaded (device/dtype kept)
    pipe = Pipeline.from_pretrained(tok_ckpt, ar_ckpt)          # bf16 on GPU, float32 on CPU by default
    out = pipe.sample(labels, seed=0)                           # out.images (B,H,W,3) uint8, out.tokens (B,N)
    out.settings                                                # cfg etc. used: given, else the model's, else defaults

    Engine mode (`dar_fast.engine.default_mode`): CUDA compiles and captures the decode and tokenizer steps
    (use_cuda_graphs=False: compiled only; compile=False: eager); CPU runs eagerly unless compile=True
    (about 2x faster on the digits model, after a first call that compiles for minutes on a small CPU).
    """

    def __init__(self, tokenizer: Tokenizer, ar: ARModel, use_cuda_graphs: Optional[bool] = None,
                 compile: Optional[bool] = None):
        check_compatible(tokenizer, ar)
        self.tok, self.ar = tokenizer.eval(), ar.eval()
        # the sampling settings the checkpoints recommend (dar_fast.defaults); a call's own values win
        self.defaults = {**getattr(self.tok, "sampling", {}), **getattr(self.ar, "sampling", {})}
        if self.tok.device != self.ar.device:
            raise ValueError(f"tokenizer on {self.tok.device} but AR model on {self.ar.device}: put them on one device")
        # eager | compiled | captured (engine.default_mode: CUDA captures, CPU compiles only when asked)
        self.engine_mode = engine.default_mode(self.ar.device, compile, use_cuda_graphs)
        # the precision in use (from_pretrained replaces it with the mode asked for)
        self.precision = dict(mode=None, tokenizer_dtype=str(self.tok.dtype).replace("torch.", ""),
                              ar_dtype=str(self.ar.dtype).replace("torch.", ""),
                              tf32=bool(self.tok.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, tokenizer_ckpt, ar_ckpt=None, device=None, dtype=None, tokenizer_config=None,
                        ar_config=None, precision=None, tokenizer_weights=None, ar_weights=None, **kw) -> "Pipeline":
        """`tokenizer_ckpt="digits"` (and no ar_ckpt) loads the embedded default model.

        precision: "released" (AR bfloat16, tokenizer float32 with TF32 matmuls, as the released FID script;
        TF32 is switched on process-wide, as there) or "fast" (bfloat16 throughout); on CPU both are float32.
        None: `dtype` for both (default bfloat16 on GPU, float32 on CPU). *_weights: "ema" / "model" set of a
        released checkpoint (default: as the released loaders). `pipe.precision` records what was used."""
        from dar_fast.api import enable_tf32, load_ar, load_tokenizer, precision_record, resolve_precision
        device = torch.device(device or _default_device())
        tok_dtype, ar_dtype, tf32 = resolve_precision(precision, device, dtype)
        if isinstance(tokenizer_ckpt, str) and tokenizer_ckpt == "digits" and ar_ckpt is None:
            from dar_fast.assets import digits_paths
            tokenizer_ckpt, ar_ckpt = digits_paths()
        if ar_ckpt is None:
            raise ValueError("ar_ckpt is required (or pass 'digits' alone for the embedded model)")
        tok = load_tokenizer(tokenizer_ckpt, config=tokenizer_config, device=device, dtype=tok_dtype,
                             weights=tokenizer_weights)
        ar = load_ar(ar_ckpt, config=ar_config, device=device, dtype=ar_dtype, weights=ar_weights)
        if tf32:
            enable_tf32()
        pipe = cls(tokenizer=tok, ar=ar, **kw)
        pipe.precision = precision_record(precision, tok_dtype, ar_dtype, tf32)
        return pipe

    @property
    def device(self):
        return self.ar.device

    @property
    def num_classes(self) -> int:
        return self.ar.num_classes

    # ------------------------------------------------------------------ helpers users want
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) float in [-1,1] or (B,H,W,3) uint8 -> (B,N) tokens."""
        if images.dtype == torch.uint8:
            images = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return self.tok.encode(images.to(self.tok.device, self.tok.dtype)).cpu()

    def prefix_from_image(self, images: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """The first `num_tokens` tokens of a reference image: pass as prefix_tokens for zero-shot layout control."""
        if not 0 <= num_tokens <= self.tok.num_tokens:
            raise ValueError(f"num_tokens must be in [0, {self.tok.num_tokens}], got {num_tokens}")
        return self.encode(images)[:, :num_tokens]

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, seed=0, sample_ids=None, steps: Optional[int] = None,
               solver: Optional[str] = None, clip_steps: Optional[int] = None) -> torch.Tensor:
        """(B,N) tokens -> (B,H,W,3) uint8 with the keyed initial noise of (seed, ids); steps / solver / clip_steps
        as `Tokenizer.decode` (defaults as `sample`: the model's, else the tokenizer's steps and adams2)."""
        s = self.settings(steps=steps, solver=solver)
        seeds, ids = resolve_keys(seed, tokens.shape[0], sample_ids)
        noise = sample_noise(seeds, ids, (3, *self.tok.decode_size())).to(self.tok.device, torch.float32)
        img = self.tok.decode(tokens.to(self.tok.device), noise=noise, steps=s["steps"], solver=s["solver"],
                              clip_steps=clip_steps)
        return ops.images_to_uint8(img.float()).cpu()

    # ------------------------------------------------------------------ sampling
    def settings(self, **given) -> dict:
        """The sampling settings a call with these arguments uses: each given (non-None) value, else the model's
        recommended one (`self.defaults`, from its checkpoint or preset), else `dar_fast.defaults.LIBRARY_DEFAULTS`."""
        from dar_fast.defaults import resolve
        values = resolve(self.defaults, **given)[0]
        values.setdefault("steps", self.tok.check_steps(None))     # the tokenizer's own (num_denoising_steps)
        values.setdefault("solver", "adams2")                       # the released solver
        return values

    def sample(self, labels, cfg: Optional[CFG] = None, seed=0, temperature=None, top_k=None, top_p=None,
               prefix_tokens=None, sample_ids=None, steps: Optional[int] = None,
               solver: Optional[str] = None, max_batch: Optional[int] = None) -> SampleOutput:
        """Images for any number of labels, generated `max_batch` at a time (default: what fits in memory,
        `dar_fast.batching`); the result is identical to one batch: every sample keeps its key (seed, index)."""
        labels = check_labels(self.ar, labels)           # an int64 tensor: the check in stream is then cheap
        images = tokens = None
        for st in self.stream(labels, cfg=cfg, seed=seed, temperature=temperature, top_k=top_k, top_p=top_p,
                              prefix_tokens=prefix_tokens, sample_ids=sample_ids, previews=False, steps=steps,
                              solver=solver, max_batch=max_batch):
            if st.preview is None:          # previews=False: only each chunk's last step carries its images
                continue
            if st.rows is None:
                images, tokens = st.preview, st.tokens
                continue
            a, b = st.rows
            if images is None:              # filled chunk by chunk: no concatenation, no second copy
                B = labels.numel()
                images = torch.empty((B, *st.preview.shape[1:]), dtype=st.preview.dtype)
                tokens = torch.empty((B, *st.tokens.shape[1:]), dtype=st.tokens.dtype)
            images[a:b], tokens[a:b] = st.preview, st.tokens
        return SampleOutput(images=images, tokens=tokens,
                            settings=self.settings(cfg=cfg, temperature=temperature, top_k=top_k, top_p=top_p,
                                                   steps=steps, solver=solver))

    @torch.no_grad()
    def stream(self, labels, cfg: Optional[CFG] = None, seed=0, temperature=None, top_k=None, top_p=None,
               prefix_tokens=None, sample_ids=None, previews: bool = True, steps: Optional[int] = None,
               solver: Optional[str] = None, profile: Optional[dict] = None,
               max_batch: Optional[int] = None) -> Iterator[StreamStep]:
        """Yield a StreamStep after every diffusion step (steps: default the tokenizer's; solver: "adams2"
        (default) or "euler"); the last step's preview is the final image, its tokens all N tokens.

        max_batch: labels generated at once (default `batching.default_max_batch`: what fits in memory). With
        more labels than that, the chunks run one after another and each step says which labels it covers
        (`step.rows = (start, stop)`; None when one chunk covers all); samples are identical either way.

        profile: a dict that receives seconds spent in 'ar' (prefill + decode steps) and 'tokenizer'
        (decoder layers + diffusion steps + previews); it synchronises the device, so use it to measure only."""
        tok, ar = self.tok, self.ar
        s = self.settings(cfg=cfg, temperature=temperature, top_k=top_k, top_p=top_p, steps=steps, solver=solver)
        cfg, temperature, top_k, top_p = s["cfg"], s["temperature"], s["top_k"], s["top_p"]
        steps, solver = s["steps"], s["solver"]
        labels = check_labels(ar, labels)
        B, N = labels.numel(), tok.num_tokens
        if B == 0:
            raise ValueError("labels is empty")
        check_sampling_args(cfg, temperature, top_k, top_p)
        prefix = check_prefix(tok, prefix_tokens, B)
        seeds, ids = resolve_keys(seed, B, sample_ids)
        scales = cfg_schedule(cfg, N)
        tok.check_steps(steps)
        if solver is not None and solver not in SOLVERS:
            raise ValueError(f"solver must be 'adams2' or 'euler', got {solver!r}")
        if max_batch is None:
            max_batch = batching.default_max_batch(tok, ar, guided=scales is not None)
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise UsageError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if B <= max_batch:
            return engine.stream(self, labels, seeds, ids, scales, temperature, top_k, top_p, prefix, previews,
                                 profile, steps=steps, solver=solver)
        return self._chunks(max_batch, labels, seeds, ids, scales, temperature, top_k, top_p, prefix, previews,
                            profile, steps, solver)

    @torch.no_grad()
    def _chunks(self, max_batch, labels, seeds, ids, scales, temperature, top_k, top_p, prefix, previews, profile,
                steps, solver) -> Iterator[StreamStep]:
        for a, b in batching.chunks(labels.numel(), max_batch):
            for st in engine.stream(self, labels[a:b], seeds[a:b], ids[a:b], scales, temperature, top_k, top_p,
                                    None if prefix is None else prefix[a:b], previews, profile, steps=steps,
                                    solver=solver):
                st.rows = (a, b)
                yield st
