"""Continuous batching for `dar-fast serve`: one worker thread owns the model and the device.

Why cohorts. The AR model decodes a batch at one shared sequence slot (one KV slot and
one RoPE position for every row), so rows at different positions cannot share a decode
step. The worker keeps several *cohorts* in flight instead: a cohort is a set of rows
at the same (group, position) with the same sampling settings, holding its own AR KV
cache. The worker advances the cohorts round-robin, one group (G tokens + one diffusion
step) per turn, so a request that arrives now starts at the next group boundary instead
of waiting for the running batch to finish; cohorts that reach the same (group,
position) with the same settings merge into one batch; a request whose rows finish
leaves at once; a cancelled request (client gone) is cut out of its cohort's cache.

Exactness. Every random number of a row comes from its key (seed, sample id, position),
so a row's tokens depend on its own logits only. Rows of different requests share the
AR batches; the tokenizer side (condition tokens, velocity, flow step, previews) runs
per request with exactly the calls and shapes of `Pipeline.stream`, so for the same
tokens the pixels are the same bits. The AR logits of a row are the same bits in any
batch when the matmuls are row-invariant: measured on this project's CPU (MKL, one
thread) a Linear is row-invariant for batches of >= 4 rows; a 1-label request alone
(2 rows with CFG) takes MKL's small-batch path and its logits differ by ~1e-6, which
changes a token only if its draw lands within ~1e-6 of a CDF boundary (see the report
in benchmarks/results/serve-cpu-*.json and tests/test_serve.py for what was checked).
"""
from __future__ import annotations

import collections
import itertools
import threading
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from dar_fast import ops
from dar_fast.models.ar import KVCache
from dar_fast.seeding import sample_noise


class QueueFull(Exception):
    """More rows waiting than --max-queue allows: the HTTP layer answers 503 with Retry-After."""


@dataclass(eq=False)          # identity: jobs hold tensors, and "job in list" must not compare them
class Job:
    """One request: B rows with their keys and settings, and what the worker tells its client.

    emit(kind, payload) is called from the worker thread: ("preview", {"group", "images"}),
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
    cancelled: bool = False
    # worker state
    tokens: Optional[torch.Tensor] = None
    x: Optional[torch.Tensor] = None
    v_prev: Optional[torch.Tensor] = None
    cond_cache: Optional[list] = None
    id: int = field(default_factory=itertools.count().__next__)

    @property
    def B(self) -> int:
        return self.labels.numel()

    @property
    def P(self) -> int:
        return 0 if self.prefix is None else self.prefix.shape[1]

    def cancel(self):
        self.cancelled = True            # read by the worker at the next group boundary (a bool store is atomic)


class _Cohort:
    """Rows at one (group, position) sharing an AR batch: rows [cond of job 1, job 2, ...; null of job 1, ...]."""

    def __init__(self, jobs: List[Job], group: int, pos: int, caches: List[KVCache], logits):
        self.jobs, self.group, self.pos, self.caches, self.logits = jobs, group, pos, caches, logits
        j0 = jobs[0]
        self.guided = j0.scales is not None
        self.settings = (j0.temperature, j0.top_k, j0.top_p)

    @property
    def B(self) -> int:
        return sum(j.B for j in self.jobs)

    def key(self):
        return (self.group, self.pos, self.guided, self.settings)

    def row_index(self, keep: List[Job]) -> torch.Tensor:
        """Rows (in cache layout) of the jobs in `keep`, in their current order."""
        starts, s = {}, 0
        for j in self.jobs:
            starts[j.id] = s
            s += j.B
        idx = [r for j in keep for r in range(starts[j.id], starts[j.id] + j.B)]
        if self.guided:
            idx = idx + [self.B + r for r in idx]
        return torch.tensor(idx, dtype=torch.int64)


def _halves(t: torch.Tensor, B: int, guided: bool):
    return (t[:B], t[B:]) if guided else (t, t[:0])


class Batcher:
    """The worker thread and its queue. submit() from any thread; everything else runs in the worker."""

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
        self.steps = 0                     # cohort-group steps taken (tests read it)
        self.max_rows_seen = 0             # largest AR batch (rows of one cohort) run so far
        self._thread = threading.Thread(target=self._loop, name="dar-fast-serve-engine", daemon=True)
        self.error: Optional[BaseException] = None

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
        """FIFO: jobs that fit beside the running rows (a job waits rather than be overtaken)."""
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

    def _new_caches(self, rows: int) -> List[KVCache]:
        ar = self.ar
        L = ar.num_tokens + 1                    # as ARModel.setup_cache: the class token + N slots
        return [KVCache(rows, layer.attention.n_kv, L, layer.attention.hd, ar.dtype, self.dev) for layer in ar.layers]

    def _use(self, caches: List[KVCache], rows: int):
        # the AR model reads its KV cache from its layers: point them at this cohort's buffers
        ar = self.ar
        if getattr(ar, "causal_mask", None) is None or ar.cache_len != ar.num_tokens + 1:
            ar.setup_cache(rows)
        for layer, kv in zip(ar.layers, caches):
            layer.attention.kv_cache = kv
        ar.cache_batch = rows

    def _admit(self, jobs: List[Job]):
        tok, N = self.tok, self.tok.num_tokens
        groups = collections.OrderedDict()
        for j in jobs:
            if j.cancelled:
                self.running_rows -= j.B
                continue
            # per-request tokenizer state, as Pipeline.stream makes it
            j.tokens = torch.zeros(j.B, N, dtype=torch.int64, device=self.dev)
            if j.P:
                j.tokens[:, :j.P] = j.prefix.to(self.dev)
            j.x = sample_noise(j.seeds, j.ids, (3, *tok.image_size)).to(self.dev, torch.float32)
            j.v_prev = None
            j.cond_cache = tok.new_cond_cache(j.B)
            key = (j.P, j.scales is not None, j.temperature, j.top_k, j.top_p)
            groups.setdefault(key, []).append(j)
        for (P, guided, *_), js in groups.items():
            B = sum(j.B for j in js)
            rows = 2 * B if guided else B
            caches = self._new_caches(rows)
            logits = None
            if P < N:
                lab = torch.cat([j.labels for j in js]).to(self.dev)
                pre = torch.cat([j.prefix for j in js]).to(self.dev) if P else None
                if guided:
                    lab = torch.cat([lab, torch.full_like(lab, self.ar.null_class)])
                    pre = None if pre is None else torch.cat([pre, pre])
                self._use(caches, rows)
                logits = self.ar.prefill(lab, pre)
            self._cohorts.append(_Cohort(js, 0, P, caches, logits))

    def _drop_cancelled(self):
        for c in list(self._cohorts):
            gone = [j for j in c.jobs if j.cancelled]
            if gone:
                self._remove(c, gone)

    def _remove(self, c: _Cohort, gone: List[Job]):
        keep = [j for j in c.jobs if j not in gone]
        self.running_rows -= sum(j.B for j in gone)
        if not keep:
            self._cohorts.remove(c)
            return
        idx = c.row_index(keep).to(self.dev)
        new = self._new_caches(len(idx))
        for a, b in zip(new, c.caches):
            a.k_cache.copy_(b.k_cache.index_select(0, idx))
            a.v_cache.copy_(b.v_cache.index_select(0, idx))
        c.caches = new
        c.logits = None if c.logits is None else c.logits.index_select(0, idx)
        c.jobs = keep

    def _merge(self):
        by_key = collections.OrderedDict()
        for c in self._cohorts:
            by_key.setdefault(c.key(), []).append(c)
        if all(len(v) == 1 for v in by_key.values()):
            return
        merged = []
        for cs in by_key.values():
            if len(cs) == 1:
                merged.append(cs[0])
                continue
            guided = cs[0].guided
            parts = [_halves(torch.arange(2 * c.B if guided else c.B), c.B, guided) for c in cs]
            caches = self._new_caches(sum(2 * c.B if guided else c.B for c in cs))
            for li, kv in enumerate(caches):
                for name in ("k_cache", "v_cache"):
                    src = [getattr(c.caches[li], name) for c in cs]
                    cond = [s.index_select(0, p[0]) for s, p in zip(src, parts)]
                    null = [s.index_select(0, p[1]) for s, p in zip(src, parts)]
                    getattr(kv, name).copy_(torch.cat(cond + null))
            logits = None
            if cs[0].logits is not None:
                logits = torch.cat([c.logits.index_select(0, p[0]) for c, p in zip(cs, parts)]
                                   + [c.logits.index_select(0, p[1]) for c, p in zip(cs, parts)])
            merged.append(_Cohort([j for c in cs for j in c.jobs], cs[0].group, cs[0].pos, caches, logits))
        self._cohorts = merged
        self._rr = 0

    def _next_cohort(self) -> _Cohort:
        self._rr %= len(self._cohorts)
        c = self._cohorts[self._rr]
        self._rr += 1
        return c

    def _advance(self, c: _Cohort):
        """One group of cohort c: its G tokens (batched over every request in it), then each request's
        tokenizer step and preview (per request, as Pipeline.stream)."""
        tok, N, G, K = self.tok, self.tok.num_tokens, self.tok.group_size, self.tok.num_groups
        g, B, guided = c.group, c.B, c.guided
        end = (g + 1) * G
        if c.pos < end and c.pos < N:
            temperature, top_k, top_p = c.settings
            rows = 2 * B if guided else B
            self._use(c.caches, rows)
            self.max_rows_seen = max(self.max_rows_seen, rows)
            seeds = torch.cat([j.seeds for j in c.jobs]).to(self.dev)
            ids = torch.cat([j.ids for j in c.jobs]).to(self.dev)
            scales = torch.stack([j.scales for j in c.jobs]).to(self.dev) if guided else None  # (jobs, N)
            reps = torch.tensor([j.B for j in c.jobs], device=self.dev)
            while c.pos < end:
                p = c.pos
                cond, unc = _halves(c.logits, B, guided)
                scale = scales[:, p].repeat_interleave(reps) if guided else 1.0
                t = ops.sample_tokens(cond, unc if guided else None, cfg_scale=scale, temperature=temperature,
                                      top_k=top_k, top_p=top_p, seeds=seeds, sample_ids=ids, positions=p)
                s = 0
                for j in c.jobs:
                    j.tokens[:, p] = t[s:s + j.B]
                    s += j.B
                if p < N - 1:
                    c.logits = self.ar.decode_one(torch.cat([t, t]) if guided else t, p + 1)
                c.pos += 1
        ts = tok.times()
        data_std = tok.cfg.diff_decoder.data_std
        last = g == K - 1
        for j in c.jobs:
            cond = tok.cond_incremental(j.tokens[:, g * G:(g + 1) * G], g * G, j.cond_cache)
            tt = torch.full((j.B,), ts[g], device=self.dev, dtype=torch.float32)
            v = tok.velocity(j.x.to(tok.dtype), tt, cond).float()
            if j.previews or last:
                # the preview is the update taken straight to t = 1; after the last group it is the image
                img = ops.flow_preview(j.x, v, j.v_prev, ts[g], data_std=data_std, to_uint8=True).cpu()
                if j.previews:
                    j.emit("preview", {"group": g, "images": img})
                if last:
                    j.emit("done", {"images": img, "tokens": j.tokens.cpu()})
            if not last:
                j.x = ops.flow_step(j.x, v, j.v_prev, ts[g], ts[g + 1])
            j.v_prev = v
        c.group += 1
        self.steps += 1
        if last:
            self._remove(c, list(c.jobs))
