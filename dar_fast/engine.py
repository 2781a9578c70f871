"""The streaming engine behind `Pipeline.stream`.

One generation with S diffusion steps over K groups of G tokens (step i reads group g_i,
`Tokenizer.schedule`):
    for step i: decode steps until group g_i is complete (all N tokens before the last step)
                -> the tokenizer's causal decoder layers on each newly completed group (K/V cached)
                -> diffusion step i (DiT velocity, Euler / Adams-Bashforth) -> optional preview
so the preview after step i equals `Tokenizer.decode(tokens, noise, steps=S, solver, clip_steps=i+1)`
and costs no extra network call; the image after the last step is the final image.

The work runs in two objects with static buffers (`engine_graphs.DecodeStep`, `TokenizerStep`),
eager, compiled or captured (see there). The host launches steps and reads nothing back while
a group generates: positions, scales and times live on the device; tokens and previews are
copied out after each diffusion step (previews only when asked).
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


@torch.no_grad()
def stream(pipe, labels: torch.Tensor, seeds: torch.Tensor, ids: torch.Tensor, scales: Optional[torch.Tensor],
           temperature: float, top_k: int, top_p: float, prefix: Optional[torch.Tensor], previews: bool,
           profile: Optional[dict], steps: Optional[int] = None, solver: Optional[str] = None) -> Iterator[StreamStep]:
    """Checked inputs (CPU tensors) -> a StreamStep after every diffusion step; see Pipeline.stream."""
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
    refresh_fused(ar, tok)          # merged-weight copies follow the parameters (compiled code does not check)
    clock = _Clock(profile, dev)
    clock.start()
    guided = scales is not None
    dec = _steps_for(pipe, ("decode", B, guided, float(temperature), int(top_k), float(top_p)),
                     lambda: DecodeStep(ar, B, guided, temperature, top_k, top_p, mode))
    size = tok.decode_size()
    ts = _steps_for(pipe, ("tokenizer", B, size), lambda: TokenizerStep(tok, B, size, mode))
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
    done, cond_groups = P, 0
    for i in range(S):
        last = i == S - 1
        g = groups[i]
        need = N if last else max((g + 1) * G, starts[i] + G)
        if done < need:
            dec.run(done, need)
            done = need
        clock.lap("ar")
        while cond_groups * G < starts[i] + G:          # decoder layers on each completed group, in order
            ts.cond_group(cond_groups)
            cond_groups += 1
        ts.diffusion(i, starts[i], preview=previews or last)
        preview = _host(ts.image) if (previews or last) else None
        clock.lap("tokenizer")
        yield StreamStep(step=i, group=g, tokens=_host(dec.tokens[:, :done]), preview=preview)


def _host(t: torch.Tensor) -> torch.Tensor:
    """A host copy that the next call cannot overwrite (on CPU, .cpu() would return the static buffer)."""
    return t.cpu() if t.device.type != "cpu" else t.clone()


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
