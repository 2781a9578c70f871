"""The streaming engine and the public sampling API.

One generation, per group g of G tokens (K groups):
    G x [decode step: embed -> L layers (static KV cache) -> logits -> CFG -> keyed sample]
    -> the tokenizer's causal decoder layers on the G new tokens (incremental, K/V cached)
    -> one flow step on pixels (Euler for g = 0, Adams-Bashforth after) -> optional preview
so the preview after group g costs no extra network call, and the image after the
last group is the last preview.

On CUDA the decode step and each group's tokenizer step are captured once as CUDA
graphs and replayed on one stream (static buffers; positions live in device
tensors that the graph itself advances); the host only launches graphs and, when
asked, copies previews. On CPU the same engine runs eagerly.

Keys: sample i of a call with seed s uses (s, i) (or the ids the caller passes);
tokens come from `ops.sample_tokens` keyed by (seed, id, position) and the
initial noise from `seeding.sample_noise`, so a sample is the same alone or in
any batch, on any device, up to float rounding of the pixels.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from dar_fast import ops
from dar_fast.models import ARModel, Tokenizer
from dar_fast.sampler import (CFG, SampleOutput, cfg_schedule, check_compatible, check_labels, check_prefix)
from dar_fast.seeding import resolve_keys, sample_noise


@dataclass
class StreamStep:
    group: int                       # 0-based group just finished
    tokens: torch.Tensor             # (B, (group+1)*G) int64, tokens so far
    preview: Optional[torch.Tensor]  # (B,H,W,3) uint8 jump-to-t=1 estimate; after the last group, the final image


def _default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


class Pipeline:
    """Tokenizer + AR model, sampling through the streaming engine.

    pipe = Pipeline(tokenizer=tok, ar=ar)                       # models as loaded (device/dtype kept)
    pipe = Pipeline.from_pretrained(tok_ckpt, ar_ckpt)          # bf16 on GPU, float32 on CPU by default
    out = pipe.sample(labels, cfg=4.0, seed=0)                  # out.images (B,H,W,3) uint8, out.tokens (B,N)
    """

    def __init__(self, tokenizer: Tokenizer, ar: ARModel, use_cuda_graphs: Optional[bool] = None):
        check_compatible(tokenizer, ar)
        self.tok, self.ar = tokenizer.eval(), ar.eval()
        if self.tok.device != self.ar.device:
            raise ValueError(f"tokenizer on {self.tok.device} but AR model on {self.ar.device}: put them on one device")
        on_cuda = self.ar.device.type == "cuda"
        env = os.environ.get("DAR_FAST_CUDA_GRAPHS")
        self.use_cuda_graphs = on_cuda and (use_cuda_graphs if use_cuda_graphs is not None else env != "0")
        self._graphs = {}
        self._graph_cache_ptr = None
        self._graph_class = _GraphedDecode     # tests swap in an eager stand-in to check the buffer logic on CPU

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, tokenizer_ckpt, ar_ckpt=None, device=None, dtype=None, tokenizer_config=None,
                        ar_config=None, **kw) -> "Pipeline":
        """`tokenizer_ckpt="digits"` (and no ar_ckpt) loads the embedded default model."""
        from dar_fast.api import load_ar, load_tokenizer
        device = torch.device(device or _default_device())
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if isinstance(tokenizer_ckpt, str) and tokenizer_ckpt == "digits" and ar_ckpt is None:
            from dar_fast.assets import digits_paths
            tokenizer_ckpt, ar_ckpt = digits_paths()
        if ar_ckpt is None:
            raise ValueError("ar_ckpt is required (or pass 'digits' alone for the embedded model)")
        tok = load_tokenizer(tokenizer_ckpt, config=tokenizer_config, device=device, dtype=dtype)
        ar = load_ar(ar_ckpt, config=ar_config, device=device, dtype=dtype)
        return cls(tokenizer=tok, ar=ar, **kw)

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
    def decode(self, tokens: torch.Tensor, seed=0, sample_ids=None) -> torch.Tensor:
        """(B,N) tokens -> (B,H,W,3) uint8 with the keyed initial noise of (seed, ids)."""
        seeds, ids = resolve_keys(seed, tokens.shape[0], sample_ids)
        noise = sample_noise(seeds, ids, (3, *self.tok.image_size)).to(self.tok.device, self.tok.dtype)
        img = self.tok.decode(tokens.to(self.tok.device), noise=noise)
        return ops.images_to_uint8(img.float()).cpu()

    # ------------------------------------------------------------------ sampling
    def sample(self, labels, cfg: CFG = 4.0, seed=0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               prefix_tokens=None, sample_ids=None) -> SampleOutput:
        last = None
        for last in self.stream(labels, cfg=cfg, seed=seed, temperature=temperature, top_k=top_k, top_p=top_p,
                                prefix_tokens=prefix_tokens, sample_ids=sample_ids, previews=False):
            pass
        return SampleOutput(images=last.preview, tokens=last.tokens)

    @torch.no_grad()
    def stream(self, labels, cfg: CFG = 4.0, seed=0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               prefix_tokens=None, sample_ids=None, previews: bool = True,
               profile: Optional[dict] = None) -> Iterator[StreamStep]:
        """Yield a StreamStep after every group; the last step's preview is the final image.

        profile: a dict that receives seconds spent in 'ar' (prefill + decode steps) and 'tokenizer'
        (decoder layers + diffusion steps + previews); it synchronises the device, so use it to measure only."""
        tok, ar = self.tok, self.ar
        labels = check_labels(ar, labels)
        B, N, G, K = labels.numel(), tok.num_tokens, tok.group_size, tok.num_groups
        if B == 0:
            raise ValueError("labels is empty")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_k < 0 or not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_k must be >= 0 and top_p in (0, 1], got top_k={top_k}, top_p={top_p}")
        prefix = check_prefix(tok, prefix_tokens, B)
        seeds, ids = resolve_keys(seed, B, sample_ids)
        scales = cfg_schedule(cfg, N)
        dev = self.device
        clock = _Clock(profile, dev)
        clock.start()
        gen = _Generation(self, labels.to(dev), seeds.to(dev), ids.to(dev), scales, temperature, top_k, top_p,
                          None if prefix is None else prefix.to(dev))
        noise = sample_noise(seeds, ids, (3, *tok.image_size)).to(dev, torch.float32)
        x, v_prev = noise, None
        ts = tok.times()
        data_std = tok.cfg.diff_decoder.data_std
        clock.lap("ar")
        for g in range(K):
            gen.tokens_until((g + 1) * G)
            clock.lap("ar")
            v = gen.velocity(g, x, ts[g])                                     # (B,3,H,W) float32
            last = g == K - 1
            preview = None
            if previews or last:
                # the preview is the same update taken straight to t = 1; after the last group it is the image
                preview = ops.flow_preview(x, v, v_prev, ts[g], data_std=data_std, to_uint8=True).cpu()
            if not last:
                x = ops.flow_step(x, v, v_prev, ts[g], ts[g + 1])
            v_prev = v
            clock.lap("tokenizer")
            yield StreamStep(group=g, tokens=gen.tokens[:, :(g + 1) * G].cpu(), preview=preview)


class _Clock:
    """Accumulates wall time per phase when a profile dict is given (device-synchronised); free otherwise."""

    def __init__(self, out: Optional[dict], device):
        self.out, self.cuda = out, torch.device(device).type == "cuda"
        self.t = 0.0

    def _now(self):
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self):
        if self.out is not None:
            self.t = self._now()

    def lap(self, name: str):
        if self.out is not None:
            now = self._now()
            self.out[name] = self.out.get(name, 0.0) + now - self.t
            self.t = now


class _Generation:
    """State of one call: AR KV cache over [cond; null] rows, tokenizer K/V cache, keyed sampling."""

    def __init__(self, pipe: Pipeline, labels, seeds, ids, scales, temperature, top_k, top_p, prefix):
        self.pipe, self.tok, self.ar = pipe, pipe.tok, pipe.ar
        self.B = labels.numel()
        self.guided = scales is not None
        self.rows = 2 * self.B if self.guided else self.B
        self.seeds, self.ids = seeds, ids
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        dev = labels.device
        self.scales = None if scales is None else scales.to(dev)
        N = self.tok.num_tokens
        self.tokens = torch.zeros(self.B, N, dtype=torch.int64, device=dev)
        self.P = 0 if prefix is None else prefix.shape[1]
        if self.P:
            self.tokens[:, :self.P] = prefix
        self.next = self.P                      # next position to sample
        self.ar.setup_cache(self.rows)
        kv = self.ar.layers[0].attention.kv_cache.k_cache
        if pipe._graphs and pipe._graph_cache_ptr != kv.data_ptr():
            pipe._graphs.clear()                 # the KV buffers moved: graphs hold stale addresses
        pipe._graph_cache_ptr = kv.data_ptr()
        self.cond_cache = self.tok.new_cond_cache(self.B)
        # capture before the prefill: warm-up steps scribble on cache slots the prefill then rewrites
        self.decoder = _GraphedDecode.get(pipe, self) if pipe.use_cuda_graphs and self.P < N else None
        self.logits = None
        if self.P < N:
            lab = torch.cat([labels, torch.full_like(labels, self.ar.null_class)]) if self.guided else labels
            pre = None if prefix is None else (torch.cat([prefix, prefix]) if self.guided else prefix)
            self.logits = self.ar.prefill(lab, pre)                           # (rows, V) predicts token P

    def _sample(self, logits, j):
        c, u = (logits[:self.B], logits[self.B:]) if self.guided else (logits, None)
        return ops.sample_tokens(c, u, cfg_scale=float(self.scales[j]) if self.guided else 1.0,
                                 temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                 seeds=self.seeds, sample_ids=self.ids, positions=j)

    def tokens_until(self, end: int):
        N = self.tok.num_tokens
        if self.decoder is not None and self.next < end:
            self.next = self.decoder.run(self, self.next, end)
            return
        while self.next < end:
            j = self.next
            t = self._sample(self.logits, j)
            self.tokens[:, j] = t
            if j < N - 1:
                self.logits = self.ar.decode_one(torch.cat([t, t]) if self.guided else t, j + 1)
            self.next += 1

    def velocity(self, g: int, x: torch.Tensor, t: float) -> torch.Tensor:
        tok = self.tok
        G = tok.group_size
        cond = tok.cond_incremental(self.tokens[:, g * G:(g + 1) * G], g * G, self.cond_cache)
        t = torch.full((self.B,), t, device=x.device, dtype=torch.float32)
        return tok.velocity(x.to(tok.dtype), t, cond).float()


class _GraphedDecode:
    """One CUDA graph per (batch, guidance, sampling settings): a decode step + keyed sample that advances its own
    position counters, replayed once per token. The host never reads a token back."""

    def __init__(self, pipe: Pipeline, gen: _Generation):
        ar, dev, N = gen.ar, gen.tokens.device, gen.tok.num_tokens
        self.ar_decode = ar.decode_one
        self.B, self.guided = gen.B, gen.guided
        self.pos = torch.zeros(1, dtype=torch.int64, device=dev)           # position j being sampled
        self.logits = torch.zeros(gen.rows, ar.vocab_size, dtype=torch.float32, device=dev)
        self.tokens = torch.zeros(gen.B, N, dtype=torch.int64, device=dev)
        self.seeds = torch.zeros(gen.B, dtype=torch.int64, device=dev)
        self.ids = torch.zeros(gen.B, dtype=torch.int64, device=dev)
        self.scales = torch.ones(N, dtype=torch.float32, device=dev)
        self.settings = (gen.temperature, gen.top_k, gen.top_p)
        self._capture()

    def _capture(self):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):                 # warm up kernels/allocator outside capture
                self._step()
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()

    def _replay(self):
        self.graph.replay()

    def _step(self):
        B, pos = self.B, self.pos
        c, u = (self.logits[:B], self.logits[B:]) if self.guided else (self.logits, None)
        temperature, top_k, top_p = self.settings
        scale = self.scales.index_select(0, pos).expand(B)
        t = ops.sample_tokens(c, u, cfg_scale=scale, temperature=temperature, top_k=top_k, top_p=top_p,
                              seeds=self.seeds, sample_ids=self.ids, positions=pos.expand(B))
        self.tokens.index_copy_(1, pos, t[:, None])
        # token j goes to cache slot j+1 <= N (the cache holds N+1 slots); after the last token these
        # logits are never read, and computing them keeps one graph for every position
        self.logits.copy_(self.ar_decode(torch.cat([t, t]) if self.guided else t, pos + 1))
        pos.add_(1)

    @staticmethod
    def get(pipe: Pipeline, gen: _Generation) -> "_GraphedDecode":
        key = (gen.B, gen.guided, gen.temperature, gen.top_k, gen.top_p, gen.tok.num_tokens)
        g = pipe._graphs.get(key)
        if g is None:
            try:
                g = pipe._graph_class(pipe, gen)
            except Exception as e:   # capture failures must cost speed, never results
                warnings.warn(f"dar-fast: CUDA graph capture failed ({e}); running the decode step eagerly")
                pipe.use_cuda_graphs = False
                return None
            pipe._graphs[key] = g
        return g

    def run(self, gen: _Generation, start: int, end: int) -> int:
        # load this call's state into the static buffers, replay, copy the tokens out
        self.seeds.copy_(gen.seeds)
        self.ids.copy_(gen.ids)
        self.scales.copy_(gen.scales if gen.guided else torch.ones_like(self.scales))
        self.logits.copy_(gen.logits)
        self.tokens.copy_(gen.tokens)
        self.pos.fill_(start)
        for _ in range(start, end):
            self._replay()
        gen.tokens.copy_(self.tokens)
        gen.logits = self.logits.clone()
        return end
