"""Continuous batching for `dar-fast serve`: one worker thread owns the model and the device.

Why cohorts. The AR decode step runs a batch at one shared sequence slot (one KV slot and
one RoPE position for every row), so rows at different positions cannot share a step. The
worker keeps several *cohorts* in flight instead: a cohort is a set of rows at the same
diffusion step and token position with the same sampling settings and schedule, holding
its own AR KV cache (an engine `DecodeStep`). The worker advances the cohorts
round-robin, one diffusion step (its tokens + one tokenizer step) per turn, so a request
that arrives now starts at the next step boundary instead of waiting for the running
batch to finish; cohorts that reach the same (step, position) with the same settings
merge into one batch; a request whose rows finish leaves at once; a cancelled request
(client gone) is cut out of its cohort's cache.

Exactness. The work runs in the engine's own step objects (`engine_graphs.DecodeStep`,
`TokenizerStep`), eager, with the calls `engine.stream` makes. Every random number of a row
comes from its key (seed, sample id, position), so a row's tokens depend on its own logits
only. The tokenizer side (condition tokens, diffusion steps, previews) runs per request with
the request's own batch, so for the same tokens the pixels are the same bits as
`Pipeline.stream`. Rows of different requests share the AR batches; a row's logits are the
same bits in any batch when the matmuls are row-invariant: measured on this project's CPU
(MKL, one thread) a Linear is row-invariant from 4 rows up, so any request with >= 2 labels
(4 rows with CFG) gets exactly Pipeline.sample's tokens. A 1-label request alone in
Pipeline.sample (2 rows) takes MKL's small-batch path, whose logits differ by ~1e-6 from the
batched ones: its tokens can differ only when a draw lands within ~1e-6 of a CDF boundary.
Measured: 0 of 512 one-image requests run in cohorts of up to 128 rows differed from
Pipeline.sample alone (tokens or pixels), nor any of the 256 answers benchmarks/bench_serve.py checks.
"""
from __future__ import annotations

import collections
import itertools
import threading
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from dar_fast.engine_graphs import DecodeStep, TokenizerStep
from dar_fast.seeding import sample_noise

# cohorts come and go with every batch size: compiling or capturing each would cost more than it saves
MODE = "eager"


class QueueFull(Exception):
    """More rows waiting than --max-queue allows: the HTTP layer answers 503 with Retry-After."""


@dataclass(eq=False)          # identity: jobs hold tensors, and "job in list" must not compare them
class Job:
    """One request: B rows with their keys and settings, and what the worker tells its client.

    emit(kind, payload) is called from the worker thread: ("preview", {"step", "group", "images"}),
    ("done", {"images", "tokens"}) or ("error", {"error"}); images are (B,H,W,3) uint8 CPU tensors.
    """
    labels: torch.Tensor                  # (B,) int64
    seeds: torch.Tensor                   # (B,) int64
    ids: torch.Tensor                     # (B,) int64
    scales: Optional[torch.Tensor]        # (N,) float32 CFG scale per position, None = no guidance
    temperature: float
    top_k: int
    top_p: float
    prefix: Optional[torch.Tensor]        # (B,P) int64
    previews: bool
    emit: Callable[[str, dict], None]
    steps: Optional[int] = None           # diffusion steps (None: the tokenizer's own)
    solver: str = "adams2"
    cancelled: bool = False
    # worker state
    tokens: Optional[torch.Tensor] = None     # (B,N) the request's tokens, read by its TokenizerStep
    ts: Optional[TokenizerStep] = None
    cond_groups: int = 0
    id: int = field(default_factory=itertools.count().__next__)

    @property
    def B(self) -> int:
        return self.labels.numel()

    @property
    def P(self) -> int:
        return 0 if self.prefix is None else self.prefix.shape[1]

    def cancel(self):
        self.cancelled = True            # read by the worker at the next step boundary (a bool store is atomic)


class _Cohort:
    """Jobs sharing one AR batch: DecodeStep rows [cond of job 1, job 2, ...; null of job 1, job 2, ...]."""

    def __init__(self, jobs: List[Job], dec: DecodeStep, step: int, done: int, schedule):
        self.jobs, self.dec, self.step, self.done = jobs, dec, step, done
        self.times, self.groups, self.starts = schedule
        j0 = jobs[0]
        self.guided = j0.scales is not None
        self.settings = (j0.temperature, j0.top_k, j0.top_p)
        self.scales_key = None if j0.scales is None else tuple(j0.scales.tolist())
        self.sched_key = (j0.steps, j0.solver)

    @property
    def B(self) -> int:
        return sum(j.B for j in self.jobs)

    def key(self):
        return (self.step, self.done, self.guided, self.settings, self.scales_key, self.sched_key)

    def rows_of(self, keep: List[Job]) -> torch.Tensor:
        """Batch rows (cond half) of the jobs in `keep`, in their current order."""
        starts, s = {}, 0
        for j in self.jobs:
            starts[j.id] = s
            s += j.B
        return torch.tensor([r for j in keep for r in range(starts[j.id], starts[j.id] + j.B)], dtype=torch.int64)


def _job_key(j: Job):
    return (j.P, j.scales is not None, (j.temperature, j.top_k, j.top_p),
            None if j.scales is None else tuple(j.scales.tolist()), (j.steps, j.solver))


class Batcher:
    """The worker thread and its queue. submit() and call() from any thread; everything else runs in the worker."""

    def __init__(self, pipe, max_batch: int = 64, max_queue: int = 256):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch}, {max_queue}")
        self.pipe, self.tok, self.ar = pipe, pipe.tok, pipe.ar
        self.max_batch, self.max_queue = max_batch, max_queue
        self.dev = pipe.device
        self._cv = threading.Condition()
        self._pending: collections.deque = collections.deque()
        self._calls: collections.deque = collections.deque()      # (fn, future) to run in the worker
        self._cohorts: List[_Cohort] = []
        self._rr = 0
        self._stop = False
        self.queued_rows = 0
        self.running_rows = 0
        self.steps = 0                     # cohort steps taken (tests read it)
        self.max_rows_seen = 0             # largest AR batch (rows of one cohort, CFG rows included) so far
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._loop, name="dar-fast-serve-engine", daemon=True)

    # ------------------------------------------------------------------ any thread
    def start(self):
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0):
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout)

    def submit(self, job: Job):
        if job.B > self.max_batch:
            raise ValueError(f"too many labels: {job.B} > --max-batch {self.max_batch}")
        with self._cv:
            if self.queued_rows + job.B > self.max_queue:
                raise QueueFull(f"queue full ({self.queued_rows} rows waiting, --max-queue {self.max_queue})")
            self._pending.append(job)
            self.queued_rows += job.B
            self._cv.notify_all()

    def call(self, fn, future):
        """Run fn() in the worker thread (it owns the device); its result or exception goes to `future`
        (a concurrent.futures.Future)."""
        with self._cv:
            self._calls.append((fn, future))
            self._cv.notify_all()

    def stats(self) -> dict:
        return {"queue": self.queued_rows, "running": self.running_rows}

    # ------------------------------------------------------------------ worker
    def _loop(self):
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not (self._stop or self._pending or self._calls or self._cohorts):
                    self._cv.wait()
                if self._stop:
                    break
                calls = list(self._calls)
                self._calls.clear()
                admit = self._take_admissible()
            for fn, fut in calls:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as e:     # the caller gets the exception; the worker keeps serving
                        fut.set_exception(e)
            try:
                if admit:
                    self._admit(admit)
                self._drop_cancelled()
                self._merge()
                if self._cohorts:
                    self._advance(self._next_cohort())
            except Exception as e:                  # a bug must not hang clients: fail what runs, keep serving
                self.error = e
                for c in self._cohorts:
                    for j in c.jobs:
                        j.emit("error", {"error": f"internal error: {type(e).__name__}: {e}"})
                self._cohorts.clear()
                self.running_rows = 0
        for c in self._cohorts:
            for j in c.jobs:
                j.emit("error", {"error": "server shutting down"})
        for j in self._pending:
            j.emit("error", {"error": "server shutting down"})

    def _take_admissible(self) -> List[Job]:
        """FIFO: the jobs that fit beside the running rows (a job waits rather than be overtaken)."""
        out = []
        free = self.max_batch - self.running_rows
        while self._pending:
            j = self._pending[0]
            if j.cancelled:
                self._pending.popleft()
                self.queued_rows -= j.B
                continue
            if j.B > free:
                break
            self._pending.popleft()
            self.queued_rows -= j.B
            free -= j.B
            out.append(j)
        self.running_rows = self.max_batch - free
        return out

    def _decode_step(self, B: int, guided: bool, settings) -> DecodeStep:
        # a fresh KV cache: DecodeStep takes the buffers ARModel.setup_cache leaves installed, which it
        # reuses when the row count matches (another cohort's buffers)
        self.ar.cache_batch = -1
        dec = DecodeStep(self.ar, B, guided, *settings, MODE)
        self.ar.cache_batch = -1
        return dec

    def _admit(self, jobs: List[Job]):
        tok, N = self.tok, self.tok.num_tokens
        size = tok.decode_size()
        groups = collections.OrderedDict()
        for j in jobs:
            if j.cancelled:
                self.running_rows -= j.B
                continue
            # the request's tokenizer side, as engine.stream sets it up for this batch
            j.tokens = torch.zeros(j.B, N, dtype=torch.int64, device=self.dev)
            if j.P:
                j.tokens[:, :j.P] = j.prefix.to(self.dev)
            j.ts = TokenizerStep(tok, j.B, size, MODE)
            j.ts.load(j.tokens, sample_noise(j.seeds, j.ids, (3, *size)).to(self.dev, torch.float32))
            times, _ = tok.schedule(j.steps)
            j.ts.schedule(times, j.solver)
            j.cond_groups = 0
            groups.setdefault(_job_key(j), []).append(j)
        for js in groups.values():
            j0 = js[0]
            guided = j0.scales is not None
            dec = self._decode_step(sum(j.B for j in js), guided, (j0.temperature, j0.top_k, j0.top_p))
            prefix = torch.cat([j.prefix for j in js]).to(self.dev) if j0.P else None
            P = dec.load(torch.cat([j.seeds for j in js]).to(self.dev), torch.cat([j.ids for j in js]).to(self.dev),
                         None if j0.scales is None else j0.scales.to(self.dev), prefix)
            if P < N:
                lab = torch.cat([j.labels for j in js]).to(self.dev)
                lab = torch.cat([lab, torch.full_like(lab, self.ar.null_class)]) if guided else lab
                pre = None if prefix is None else (torch.cat([prefix, prefix]) if guided else prefix)
                dec.logits.copy_(self.ar.prefill(lab, pre))                       # (rows, V) predicts token P
            times, groups_ = tok.schedule(j0.steps)
            self._cohorts.append(_Cohort(js, dec, 0, P, (times, groups_, tok.query_starts(j0.steps))))

    def _drop_cancelled(self):
        for c in list(self._cohorts):
            gone = [j for j in c.jobs if j.cancelled]
            if gone:
                self._remove(c, gone)

    def _rebuild(self, parts):
        """A new DecodeStep holding the given (cohort, rows) in order: KV cache, logits, tokens, keys copied."""
        c0 = parts[0][0]
        B = sum(len(r) for _, r in parts)
        dec = self._decode_step(B, c0.guided, c0.settings)
        dev = self.dev

        def rows(c, r):      # cache rows: cond half, then (with CFG) the null half
            r = r.to(dev)
            return r, (r + c.B if c.guided else None)

        idx = [rows(c, r) for c, r in parts]
        for li, kv in enumerate(dec.caches):
            for name in ("k_cache", "v_cache"):
                src = [getattr(c.dec.caches[li], name) for c, _ in parts]
                cat = [s.index_select(0, i[0]) for s, i in zip(src, idx)]
                if c0.guided:
                    cat += [s.index_select(0, i[1]) for s, i in zip(src, idx)]
                getattr(kv, name).copy_(torch.cat(cat))
        lg = [c.dec.logits.index_select(0, i[0]) for (c, _), i in zip(parts, idx)]
        if c0.guided:
            lg += [c.dec.logits.index_select(0, i[1]) for (c, _), i in zip(parts, idx)]
        dec.logits.copy_(torch.cat(lg))
        for name in ("tokens", "seeds", "ids"):
            rows_ = [getattr(c.dec, name).index_select(0, i[0]) for (c, _), i in zip(parts, idx)]
            getattr(dec, name).copy_(torch.cat(rows_))
        dec.scales.copy_(c0.dec.scales)
        dec.pos.copy_(c0.dec.pos)
        return dec

    def _remove(self, c: _Cohort, gone: List[Job]):
        keep = [j for j in c.jobs if j not in gone]
        self.running_rows -= sum(j.B for j in gone)
        for j in gone:
            j.ts = None
        if not keep:
            self._cohorts.remove(c)
            return
        c.dec = self._rebuild([(c, c.rows_of(keep))])
        c.jobs = keep

    def _merge(self):
        by_key = collections.OrderedDict()
        for c in self._cohorts:
            by_key.setdefault(c.key(), []).append(c)
        if all(len(v) == 1 for v in by_key.values()):
            return
        merged = []
        for cs in by_key.values():
            if len(cs) > 1:
                dec = self._rebuild([(c, c.rows_of(c.jobs)) for c in cs])
                c0 = cs[0]
                cs = [_Cohort([j for c in cs for j in c.jobs], dec, c0.step, c0.done, (c0.times, c0.groups, c0.starts))]
            merged.append(cs[0])
        self._cohorts = merged
        self._rr = 0

    def _next_cohort(self) -> _Cohort:
        self._rr %= len(self._cohorts)
        c = self._cohorts[self._rr]
        self._rr += 1
        return c

    def _advance(self, c: _Cohort):
        """Diffusion step i of cohort c: the tokens it needs (batched over every request in the cohort), then
        each request's tokenizer step and preview (per request, as engine.stream runs them)."""
        N, G = self.tok.num_tokens, self.tok.group_size
        i, S = c.step, len(c.groups)
        last = i == S - 1
        need = N if last else max((c.groups[i] + 1) * G, c.starts[i] + G)
        if c.done < need:
            self.max_rows_seen = max(self.max_rows_seen, c.dec.rows)
            c.dec.run(c.done, need)
            c.done = need
            s = 0
            for j in c.jobs:                    # the requests' token buffers, read by their TokenizerSteps
                j.tokens.copy_(c.dec.tokens[s:s + j.B])
                s += j.B
        for j in c.jobs:
            while j.cond_groups * G < c.starts[i] + G:
                j.ts.cond_group(j.cond_groups)
                j.cond_groups += 1
            j.ts.diffusion(i, c.starts[i], preview=j.previews or last)
            if j.previews or last:
                img = j.ts.image.clone().cpu()
                if j.previews:
                    j.emit("preview", {"step": i, "group": c.groups[i], "images": img})
                if last:
                    j.emit("done", {"images": img, "tokens": j.tokens.cpu().clone()})
        c.step += 1
        self.steps += 1
        if last:
            self._remove(c, list(c.jobs))
