"""The streaming engine behind `Pipeline.stream`.

One generation with S diffusion steps over K groups of G tokens (step i reads group g_i,
`Tokenizer.schedule`):
    for step i: decode steps until group g_i is complete (all N tokens before the last step)
                -> the tokenizer's causal decoder layers on each newly completed group (K/V cached)
                -> diffusion step i (DiT velocity, Euler / Adams-Bashforth) -> optional preview
so the preview after step i equals `Tokenizer.decode(tokens, noise, steps=S, solver, clip_steps=i+1)`
and costs no extra network call; the image after the last step is the final image.

The work runs in two objects with static buffers (`engine_graphs.DecodeStep`, `TokenizerStep`),
eager, compiled or captured (see there). Positions, scales and times live on the device; the host
reads nothing back inside a step's decode/tokenizer work. After each diffusion step the tokens
generated so far, and the uint8 preview when previews are asked or at the last step, are copied out
(`_OutRing`): on CUDA with non_blocking copies into two pinned host slots and an event per slot, on
CPU with plain clones. On CUDA the loop looks ahead by one step (`lookahead_default`): step i+1's
work is queued before the host waits on step i's event and yields step i, so the GPU computes while
the host copies and the consumer works. The StreamSteps are the same with or without look-ahead.
Pipeline state after an early close: the next call reloads every buffer it reads (`load`), and any
queued work of the abandoned step runs before it on the same stream.

profile: laps synchronise the device (so they remove the overlap they measure around). 'ar' is the
prefill and the decode steps of each launch, 'tokenizer' the decoder layers, diffusion step, queued
copy-out, and the wait + host clone before each yield; with look-ahead these are per launch, so
step i+1's decode is counted before step i's copy-out wait. Time the consumer spends between
steps is counted in neither.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch

from dar_fast.defaults import SOLVERS
from dar_fast.engine_graphs import DecodeStep, TokenizerStep
from dar_fast.models.layers import refresh_fused
from dar_fast.seeding import sample_noise

MODES = ("eager", "compiled", "captured")


@dataclass
class StreamStep:
    step: int                        # 0-based diffusion step just taken
    group: int                       # the token group that step read
    tokens: torch.Tensor             # (B, T) int64, the tokens generated so far (all N at the last step)
    preview: Optional[torch.Tensor]  # (B,H,W,3) uint8 jump-to-t=1 estimate; after the last step, the final image
    rows: Optional[Tuple[int, int]] = None   # Pipeline.stream in chunks (max_batch < B): the labels [start, stop) covered


def default_mode(device, compile: Optional[bool] = None, use_cuda_graphs: Optional[bool] = None) -> str:
    """DAR_FAST_ENGINE=eager|compiled|captured wins; else CUDA: captured (compiled without graphs when
    use_cuda_graphs=False or DAR_FAST_CUDA_GRAPHS=0), CPU: eager unless compile=True (compiling the two
    steps costs tens of seconds on a CPU, once per process)."""
    env = os.environ.get("DAR_FAST_ENGINE", "").strip().lower()
    if env:
        if env not in MODES:
            raise ValueError(f"DAR_FAST_ENGINE={env!r}: expected one of {MODES}")
        if env == "captured" and torch.device(device).type != "cuda":
            raise ValueError("DAR_FAST_ENGINE=captured needs a CUDA device")
        return env
    if torch.device(device).type == "cuda":
        graphs = use_cuda_graphs if use_cuda_graphs is not None else os.environ.get("DAR_FAST_CUDA_GRAPHS") != "0"
        if compile is False:
            return "eager"
        return "captured" if graphs else "compiled"
    return "compiled" if compile else "eager"


def _steps_for(pipe, key, make):
    cache = pipe.__dict__.setdefault("_engine_steps", {})
    obj = cache.get(key)
    if obj is None:
        obj = cache[key] = make()
    return obj


def status(pipe) -> dict:
    """What ran: the mode asked for, and per step object the mode it runs in and any fallback."""
    objs = list(pipe.__dict__.get("_engine_steps", {}).values())
    return {"mode": pipe.engine_mode,
            "objects": [{"kind": type(o).__name__, "mode": o.mode, "fallback": o.fallback,
                         "attention": getattr(o, "attn_backend", None)} for o in objs],
            "fallbacks": [o.fallback for o in objs if o.fallback]}


def lookahead_default(device) -> bool:
    """DAR_FAST_LOOKAHEAD=0|1 wins; else look ahead on CUDA only.

    On CUDA the host only launches work, so launching step i+1 before handing out step i keeps the GPU busy
    while the host copies and the consumer works. On CPU "launching" a step is computing it: looking ahead
    would only delay every StreamStep by one step's compute (the first preview comes later, the total is the
    same), so the CPU default runs each step when the consumer asks for it."""
    env = os.environ.get("DAR_FAST_LOOKAHEAD", "").strip()
    if env:
        if env not in ("0", "1"):
            raise ValueError(f"DAR_FAST_LOOKAHEAD={env!r}: expected 0 or 1")
        return env == "1"
    return torch.device(device).type == "cuda"


@torch.no_grad()
def stream(pipe, labels: torch.Tensor, seeds: torch.Tensor, ids: torch.Tensor, scales: Optional[torch.Tensor],
           temperature: float, top_k: int, top_p: float, prefix: Optional[torch.Tensor], previews: bool,
           profile: Optional[dict], steps: Optional[int] = None, solver: Optional[str] = None) -> Iterator[StreamStep]:
    """Checked inputs (CPU tensors) -> a StreamStep after every diffusion step; see Pipeline.stream.

    Look-ahead (`lookahead_default`): step i's tokens (and preview, when asked or at the last step) are queued
    for copying out, step i+1's work is launched, and only then does the host wait for step i's copy and yield
    it. Without look-ahead step i+1 is launched when the consumer asks for it. The StreamSteps are identical;
    a consumer that stops after step i has paid for at most step i+1."""
    tok, ar = pipe.tok, pipe.ar
    B, N, G = labels.numel(), tok.num_tokens, tok.group_size
    solver = solver or "adams2"
    if solver not in SOLVERS:
        raise ValueError(f"solver must be 'adams2' or 'euler', got {solver!r}")
    times, groups = tok.schedule(steps)
    starts = tok.query_starts(steps)
    S = len(groups)
    dev = pipe.device
    mode = pipe.engine_mode
    ahead = lookahead_default(dev)
    refresh_fused(ar, tok)          # merged-weight copies follow the parameters (compiled code does not check)
    clock = _Clock(profile, dev)
    clock.start()
    guided = scales is not None
    dec = _steps_for(pipe, ("decode", B, guided, float(temperature), int(top_k), float(top_p)),
                     lambda: DecodeStep(ar, B, guided, temperature, top_k, top_p, mode))
    size = tok.decode_size()
    ts = _steps_for(pipe, ("tokenizer", B, size), lambda: TokenizerStep(tok, B, size, mode))
    out = _out_ring(pipe, dec, ts)
    P = dec.load(seeds.to(dev), ids.to(dev), None if scales is None else scales.to(dev),
                 None if prefix is None else prefix.to(dev))
    if P < N:
        lab = labels.to(dev)
        lab = torch.cat([lab, torch.full_like(lab, ar.null_class)]) if guided else lab
        pre = None if prefix is None else prefix.to(dev)
        pre = None if pre is None else (torch.cat([pre, pre]) if guided else pre)
        dec.logits.copy_(ar.prefill(lab, pre))                                # (rows, V) predicts token P
    noise = sample_noise(seeds, ids, (3, *size), device=dev)          # drawn on the device (keyed, same bits)
    ts.load(dec.tokens, noise)
    ts.schedule(times, solver)
    clock.lap("ar")
    state = {"done": P, "cond": 0}

    def launch(i: int):
        """Queue step i's work and the copy-out of its results; returns the handle `out.take` reads."""
        last = i == S - 1
        need = N if last else max((groups[i] + 1) * G, starts[i] + G)
        if state["done"] < need:
            dec.run(state["done"], need)
            state["done"] = need
        clock.lap("ar")
        while state["cond"] * G < starts[i] + G:          # decoder layers on each completed group, in order
            ts.cond_group(state["cond"])
            state["cond"] += 1
        ts.diffusion(i, starts[i], preview=previews or last)
        h = out.put(i, state["done"], previews or last)
        clock.lap("tokenizer")
        return h

    pending = launch(0)
    for i in range(S):
        nxt = launch(i + 1) if ahead and i + 1 < S else None
        tokens, preview = out.take(pending)
        clock.lap("tokenizer")      # the wait for step i's copy and the host clone
        yield StreamStep(step=i, group=groups[i], tokens=tokens, preview=preview)
        clock.start()               # the consumer's time between steps is neither 'ar' nor 'tokenizer'
        if i + 1 < S:
            pending = nxt if nxt is not None else launch(i + 1)


def _out_ring(pipe, dec, ts):
    """The copy-out buffers of one (DecodeStep, TokenizerStep) pair, allocated once and kept with the pipe."""
    cache = pipe.__dict__.setdefault("_engine_out", {})
    key = (id(dec), id(ts))
    ring = cache.get(key)
    if ring is None or ring.dec is not dec or ring.ts is not ts:
        ring = cache[key] = _OutRing(dec, ts)
    return ring


class _OutRing:
    """Copies a step's tokens and preview out of the step objects' static buffers.

    CUDA: two slots of pinned host memory (tokens (B, N) int64, image (B, H, W, 3) uint8) and one event each.
    `put` queues a non_blocking device-to-host copy of the whole token buffer (B*N*8 bytes, contiguous; the
    consumer gets [:, :done]) and of the image into slot i % 2 and records the slot's event; the next step's
    kernels are queued behind the copy on the same stream, so they cannot overwrite what it reads. `take`
    waits on that event only (not the whole device) and clones out of the slot, a host memcpy: a 256x256x3
    uint8 preview is 196,608 bytes per image (12.6 MB at batch 64, a few ms of memcpy), which the GPU spends
    on step i+1 instead of idling as it did behind a synchronous .cpu(). The clone is needed because the
    slot is overwritten two steps later while the consumer may still hold the StreamStep. Two slots suffice:
    at most one copy (step i+1's) is in flight while step i's slot is read.
    CPU: plain clones in `put` (pin_memory needs CUDA, and a CPU copy is synchronous anyway)."""

    def __init__(self, dec, ts):
        self.dec, self.ts = dec, ts
        self.cuda = dec.tokens.is_cuda
        if self.cuda:
            with torch.cuda.device(dec.tokens.device):
                self.tokens = [torch.empty(dec.tokens.shape, dtype=dec.tokens.dtype, pin_memory=True) for _ in range(2)]
                self.images = [torch.empty(ts.image.shape, dtype=ts.image.dtype, pin_memory=True) for _ in range(2)]
                self.events = [torch.cuda.Event() for _ in range(2)]

    def put(self, i: int, done: int, preview: bool):
        if not self.cuda:
            return (self.dec.tokens[:, :done].clone(), self.ts.image.clone() if preview else None)
        k = i % 2
        with torch.cuda.device(self.dec.tokens.device):
            self.tokens[k].copy_(self.dec.tokens, non_blocking=True)
            if preview:
                self.images[k].copy_(self.ts.image, non_blocking=True)
            self.events[k].record()
        return (k, done, preview)

    def take(self, h):
        if not self.cuda:
            return h
        k, done, preview = h
        self.events[k].synchronize()
        return self.tokens[k][:, :done].clone(), (self.images[k].clone() if preview else None)


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
