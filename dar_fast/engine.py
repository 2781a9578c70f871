"""The streaming engine behind `Pipeline.stream`.

One generation, per group g of G tokens (K groups):
    G x [decode step: embed -> L layers (static KV cache) -> logits -> CFG -> keyed sample]
    -> the tokenizer's causal decoder layers on the G new tokens (incremental, K/V cached)
    -> one flow step on pixels (Euler for g = 0, Adams-Bashforth after) -> optional preview
so the preview after group g costs no extra network call, and the image after the
last group is the last preview.

On CUDA the decode step is captured once as a CUDA graph and replayed on one stream
(static buffers; positions live in device tensors that the graph itself advances);
the host only launches graphs and, when asked, copies previews. On CPU the same
engine runs eagerly.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from dar_fast import ops
from dar_fast.seeding import sample_noise


@dataclass
class StreamStep:
    group: int                       # 0-based group just finished
    tokens: torch.Tensor             # (B, (group+1)*G) int64, tokens so far
    preview: Optional[torch.Tensor]  # (B,H,W,3) uint8 jump-to-t=1 estimate; after the last group, the final image


@torch.no_grad()
def stream(pipe, labels: torch.Tensor, seeds: torch.Tensor, ids: torch.Tensor, scales: Optional[torch.Tensor],
           temperature: float, top_k: int, top_p: float, prefix: Optional[torch.Tensor], previews: bool,
           profile: Optional[dict]) -> Iterator[StreamStep]:
    """Checked inputs (CPU tensors) -> a StreamStep after every group; see Pipeline.stream."""
    tok = pipe.tok
    G, K = tok.group_size, tok.num_groups
    dev = pipe.device
    clock = _Clock(profile, dev)
    clock.start()
    gen = _Generation(pipe, labels.to(dev), seeds.to(dev), ids.to(dev), scales, temperature, top_k, top_p,
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

    def __init__(self, pipe, labels, seeds, ids, scales, temperature, top_k, top_p, prefix):
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

    def __init__(self, pipe, gen: _Generation):
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
    def get(pipe, gen: _Generation) -> "_GraphedDecode":
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
