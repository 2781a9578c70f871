"""The training loop shared by the tokenizer and AR trainers: schedule, EMA, accumulation, logging, resume.

A trainer subclasses `Trainer` and supplies the model, its objective (an nn.Module that returns the loss terms),
the data stream and the FLOP count; `Trainer.run` does the rest:

    for step in start+1 .. steps:
        lr(step) -> every micro-batch: objective forward, (loss / accum).backward  (gradient sync on the last)
        -> clip -> optimizer.step -> EMA update
        every --log-every steps: loss terms averaged over the window and the ranks -> metrics.jsonl, progress
        every --ckpt-every steps and at the end: checkpoint.pt (exact resume state)
    at the end: final.safetensors with the EMA weights (config inside: dar_fast.load_tokenizer / load_ar open it)

Randomness a step draws itself (flow noise and times, class dropout) comes from the trainer's own generator
(seeded by ``seeding.key(seed, "trainer", rank)``); dropout layers use the global torch RNG; the data loaders
carry their own position.
All of it is saved, so on CPU in float32 "10 steps" and "5 steps, then --resume to 10" give bit-identical losses.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from dar_fast.errors import UsageError
from dar_fast.seeding import key
from dar_fast.training import checkpointing as ckpt_io
from dar_fast.training import distributed as D
from dar_fast.training import export as export_io
from dar_fast.training.parallelize import grad_sync, parallelize

METRICS_NAME = "metrics.jsonl"
FINAL_NAME = "final.safetensors"
RUN_NAME = "run.json"


# ====================================================================================== pieces

def lr_at(step: int, base: float, warmup: int = 0, decay_start: Optional[int] = None, total: int = 0,
          final: float = 0.0) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warmup over ``warmup`` steps, constant, then
    linear decay from ``decay_start`` to ``final`` at step ``total``."""
    lr = base * min(1.0, step / warmup) if warmup > 0 else base
    if decay_start is not None and total > decay_start and step > decay_start:
        p = min(1.0, (step - decay_start) / (total - decay_start))
        lr = lr * (1.0 - p) + final * p
    return lr


class EMA:
    """Exponential moving average of the trainable parameters (fp32, same sharding as the parameters).

    decay_t = min(decay, (1 + t) / (10 + t)) with ``warmup`` (so a short run is not dominated by the random
    initialisation: 0.999 alone keeps 0.999^2000 = 14% of it after 2000 steps), else the constant ``decay``
    (the released recipe). decay 0 disables it: the "EMA" is then the weights themselves."""

    def __init__(self, named_params, decay: float, warmup: bool = True):
        self.decay, self.warmup = float(decay), bool(warmup)
        self.names: List[str] = []
        self.params: List[torch.Tensor] = []
        for n, p in named_params:
            self.names.append(n)
            self.params.append(p)
        self.shadow = [p.detach().clone().float() for p in self.params] if self.enabled else []

    @property
    def enabled(self) -> bool:
        return self.decay > 0

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1.0 + step) / (10.0 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        if not self.enabled:
            return
        w = 1.0 - self.decay_at(step)
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], w)

    def state_dict(self, keep: bool = True) -> Dict[str, torch.Tensor]:
        """Full CPU tensors by parameter name (a collective for sharded parameters: every rank calls it; with
        keep=False a rank takes part but keeps nothing, so only rank 0 holds a full copy in host memory)."""
        src = self.shadow if self.enabled else [p.detach() for p in self.params]
        out = {}
        for n, t in zip(self.names, src):
            full = D.full_tensor(t).detach()
            if keep:
                out[n] = full.float().cpu().clone()
        return out

    @torch.no_grad()
    def load_state_dict(self, sd: Optional[Dict[str, torch.Tensor]], from_rank0: bool = False) -> None:
        """Full tensors -> the (possibly sharded) shadow. from_rank0: only rank 0 passes ``sd`` (others None) and
        each sharded tensor is scattered from it (FSDP2: no rank but 0 reads the checkpoint)."""
        if not self.enabled:
            return
        if sd is not None:
            missing = [n for n in self.names if n not in sd]
            if missing:
                raise UsageError(f"checkpoint EMA lacks {missing[:8]}")
        for n, s in zip(self.names, self.shadow):
            if hasattr(s, "placements"):
                from torch.distributed.tensor import distribute_tensor
                dev = s.to_local().device
                full = sd[n].to(dev, torch.float32) if sd is not None else torch.empty(s.shape, device=dev)
                kw = {"src_data_rank": 0} if from_rank0 else {}
                s.copy_(distribute_tensor(full, s.device_mesh, s.placements, **kw))
            else:
                s.copy_(sd[n].to(s.device, torch.float32))


class MetricsLog:
    """<out>/metrics.jsonl, one JSON object per logged step, written by rank 0. On resume, records past the
    checkpoint's step (a run that died after its last checkpoint) are dropped, so the file reads as one run."""

    def __init__(self, path: str, env: D.DistEnv, resume_step: int = 0):
        self.path, self.env = path, env
        if not env.is_main:
            return
        keep = []
        if resume_step > 0 and os.path.exists(path):
            with open(path) as f:
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue           # a torn last line of a killed run
                    if int(rec.get("step", 0)) <= resume_step:
                        keep.append(line)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write("".join(k + "\n" for k in keep))
        os.replace(tmp, path)

    def write(self, rec: dict) -> None:
        if not self.env.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def read_metrics(out: str) -> List[dict]:
    with open(os.path.join(out, METRICS_NAME)) as f:
        return [json.loads(line) for line in f if line.strip()]


def _json_safe(v):
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    return str(v)


# ====================================================================================== the loop

class Trainer:
    """Base trainer. Subclasses set ``kind`` and implement the hooks below."""

    kind = "?"
    throughput_key = "images_per_s"
    betas = (0.9, 0.95)          # AdamW, both released recipes

    def __init__(self, args, env: D.DistEnv):
        self.args, self.env = args, env
        self.device = env.device
        self.amp = self.device.type == "cuda" and not getattr(args, "no_bf16", False)
        self.steps = int(args.steps)
        if self.steps <= 0:
            raise UsageError(f"--steps must be positive, got {args.steps}")
        self.log_every = max(1, int(args.log_every))
        self.ckpt_every = int(args.ckpt_every or 0)
        self.global_batch = int(args.batch_size)
        from dar_fast.training.data import split_global_batch
        self.rank_batch = split_global_batch(self.global_batch, env.world_size)
        self.accum = int(getattr(args, "grad_accum", 1) or 1)
        if self.accum <= 0 or self.rank_batch % self.accum:
            raise UsageError(f"the per-rank batch {self.rank_batch} (global {self.global_batch} over "
                             f"{env.world_size} ranks) does not split into --grad-accum {self.accum} equal micro-batches")
        self.micro_batch = self.rank_batch // self.accum
        self.out = args.out
        # --grad-checkpointing: recompute the compute blocks in backward (applied by parallelize)
        self.activation_checkpointing = bool(getattr(args, "grad_checkpointing", False))
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(key(int(args.seed), "trainer", env.rank))

    # ---------------------------------------------------------------- hooks
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def build_objective(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def blocks(self, model: nn.Module) -> list:
        """Lists of the model's transformer blocks: each is sharded on its own under FSDP2."""
        return []

    def compute_blocks(self, model: nn.Module) -> list:
        """The block lists that activation checkpointing and --compile apply to (default: `blocks`)."""
        return self.blocks(model)

    def param_groups(self, objective: nn.Module):
        return [{"params": [p for p in objective.parameters() if p.requires_grad]}]

    def build_optimizer(self, groups) -> torch.optim.Optimizer:
        """AdamW at ``self.base_lr`` with ``self.betas``: fused on plain CUDA tensors, the foreach default for
        FSDP2's DTensor shards and on the CPU."""
        fused = {"fused": True} if self.device.type == "cuda" and self.strategy != "fsdp" else {}
        return torch.optim.AdamW(groups, lr=self.base_lr, betas=self.betas, **fused)

    def build_data(self):
        raise NotImplementedError

    def lr(self, step: int) -> float:
        raise NotImplementedError

    def micro_batches(self, batch):
        raise NotImplementedError

    def forward(self, wrapped: nn.Module, micro) -> Dict[str, torch.Tensor]:
        """The objective's loss terms for one micro-batch (a tuple of its inputs)."""
        return wrapped(*micro)

    def units_per_step(self) -> float:
        return float(self.global_batch)

    def flops_per_step(self) -> Optional[float]:
        return None

    def fingerprint(self) -> dict:
        """What a resumed run must share with this one; ``["model"]`` is the model's config dict (the export
        builds the model from it)."""
        raise NotImplementedError

    def export(self, model: nn.Module, path: str) -> None:
        """Write the trained model (EMA weights in place) to ``path``; rank 0 only."""
        export_io.save_model(model, path)

    def describe(self) -> str:
        return ""

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters()) if hasattr(self, "model") else 0

    @classmethod
    def main(cls, args) -> dict:
        """Join torchrun's process group (or run alone), train, leave the group; the last metrics record."""
        env = D.init_distributed(getattr(args, "device", "auto"))
        try:
            return cls(args, env).run()
        finally:
            D.shutdown(env)

    # ---------------------------------------------------------------- run
    def _autocast(self):
        if self.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def _prepare_out(self) -> Optional[str]:
        args, env = self.args, self.env
        path = os.path.join(self.out, ckpt_io.CHECKPOINT_NAME)
        resume = getattr(args, "resume", None)
        ok, msg = True, ""
        if env.is_main:
            try:
                os.makedirs(self.out, exist_ok=True)
                probe = os.path.join(self.out, f".write-test-{os.getpid()}")
                with open(probe, "w"):
                    pass
                os.remove(probe)
                # temporary files of a killed run (a half-written checkpoint is as large as the full one)
                removed = ckpt_io.remove_stale_temps_in(self.out)
                if removed:
                    print(f"train-{self.kind}: removed {removed} temporary file(s) left by a killed run in "
                          f"{self.out}", file=sys.stderr, flush=True)
            except OSError as e:
                ok, msg = False, f"cannot write to --out {self.out}: {e.strerror or e}"
            if ok and resume is None and os.path.exists(path):
                ok, msg = False, (f"{self.out} already holds a run ({ckpt_io.CHECKPOINT_NAME}); pass --resume to continue "
                                  f"it, or choose another --out")
        D.agree(ok, msg, env)
        if resume is None:
            return None
        rpath = path if resume in ("", "auto", True) else resume
        D.agree(os.path.exists(rpath), f"--resume: no checkpoint to resume from at {rpath}", env)
        return rpath

    def run(self) -> dict:
        args, env = self.args, self.env
        resume_path = self._prepare_out()
        torch.manual_seed(int(args.seed))           # identical initial weights on every rank
        model = self.build_model()
        objective = self.build_objective(model).to(self.device)
        self.model, self.objective = model, objective
        groups = self.param_groups(objective)
        names = {id(p): n for n, p in objective.named_parameters()}
        group_names = [[names[id(p)] for p in g["params"]] for g in groups]
        wrapped, self.strategy = parallelize(objective, env, blocks=self.blocks(model),
                                             compute_blocks=self.compute_blocks(model),
                                             activation_checkpointing=self.activation_checkpointing,
                                             compile=bool(getattr(args, "compile", False)),
                                             strategy=getattr(args, "strategy", "auto"), mixed_precision=self.amp)
        # FSDP2 swaps the parameters for DTensors in place: rebuild the groups by name
        after = dict(objective.named_parameters())
        groups = [dict(g, params=[after[n] for n in gn]) for g, gn in zip(groups, group_names)]
        optimizer = self.build_optimizer(groups)
        ema = EMA([(n, p) for n, p in model.named_parameters() if p.requires_grad], float(args.ema),
                  warmup=not getattr(args, "no_ema_warmup", False))
        data = self.build_data()
        start = 0
        if resume_path is not None:
            start = self._resume(resume_path, objective, optimizer, ema, data)
        final = os.path.join(self.out, FINAL_NAME)
        if start == self.steps and not os.path.exists(final):
            # killed (or out of disk) after the last checkpoint but before the export: finish the export now
            self._export(objective, ema, final)
            if env.is_main:
                if not getattr(args, "quiet", False):
                    print(f"train-{self.kind}: the run was already at step {start}; wrote the missing {final}",
                          file=sys.stderr, flush=True)
            D.barrier(env)
            return {"step": start, "exported": final}
        if start >= self.steps:
            raise UsageError(f"the run in {self.out} is already at step {start}"
                             + (f" and {FINAL_NAME} is written" if start == self.steps else "")
                             + "; pass a larger --steps to continue it")
        if env.is_main:
            with open(os.path.join(self.out, RUN_NAME), "w") as f:
                json.dump(_json_safe(dict(kind=self.kind, args=vars(args), world_size=env.world_size,
                                          global_batch=self.global_batch, rank_batch=self.rank_batch,
                                          grad_accum=self.accum, micro_batch=self.micro_batch,
                                          strategy=self.strategy, device=str(self.device), torch=torch.__version__,
                                          python=platform.python_version(), fingerprint=self.fingerprint(),
                                          start_step=start)), f, indent=1)
        metrics = MetricsLog(os.path.join(self.out, METRICS_NAME), env, start)
        log = D.RankLog(env, self.steps, start, desc=f"train-{self.kind}", quiet=getattr(args, "quiet", False))
        log.info(f"train-{self.kind}: {self.describe()} | {env.world_size} rank(s) on {self.device} "
                 f"({self.strategy}), global batch {self.global_batch} = {env.world_size} x {self.accum} x "
                 f"{self.micro_batch}, steps {start}->{self.steps}" + (" (resumed)" if start else ""))
        peak = D.peak_flops(self.device)
        flops = self.flops_per_step()
        objective.train()
        params = [p for g in groups for p in g["params"]]
        sums: Dict[str, torch.Tensor] = {}
        gnorm_sum = torch.zeros((), device=self.device)
        n_win, t0 = 0, time.perf_counter()
        last_rec = {}
        saved_at = start
        for step in range(start + 1, self.steps + 1):
            lr = self.lr(step)
            for g in optimizer.param_groups:
                g["lr"] = lr
            batch = next(data)
            micros = self.micro_batches(batch)
            for i, micro in enumerate(micros):
                with grad_sync(wrapped, self.strategy, sync=i == len(micros) - 1):
                    with self._autocast():
                        terms = self.forward(wrapped, micro)
                    (terms["loss"] / len(micros)).backward()
                for k, v in terms.items():
                    v = v.detach().float() / len(micros)
                    sums[k] = sums[k] + v if k in sums else v
            clip = float(getattr(args, "grad_clip", 0.0) or 0.0)
            if clip > 0:
                gn = torch.nn.utils.clip_grad_norm_(params, clip)
                gnorm_sum = gnorm_sum + D.full_tensor(gn).detach().float()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update(step)
            n_win += 1
            log.step()
            if step % self.log_every == 0 or step == self.steps:
                keys = sorted(sums)
                vec = torch.stack([sums[k] for k in keys])
                D.all_reduce_sum(vec, env)
                vals = (vec / (n_win * env.world_size)).tolist()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = (time.perf_counter() - t0) / n_win
                rec = {"step": step}
                rec.update({k: v for k, v in zip(keys, vals)})
                bad = [k for k, v in zip(keys, vals) if not math.isfinite(v)]
                if bad:
                    raise RuntimeError(f"training diverged: {', '.join(bad)} became non-finite at step {step} "
                                       f"(lower --lr, or check the data)")
                rec["lr"] = lr
                if clip > 0:
                    rec["grad_norm"] = float(gnorm_sum) / n_win
                rec[self.throughput_key] = self.units_per_step() / dt
                if hasattr(data, "skipped"):         # undecodable images so far, all ranks (resumed runs included)
                    sk = torch.tensor([float(data.skipped)], device=self.device)
                    D.all_reduce_sum(sk, env)
                    rec["skipped_images"] = int(sk.item())
                    if rec["skipped_images"] > last_rec.get("skipped_images", 0):
                        log.info(f"train-{self.kind}: {rec['skipped_images']} undecodable image(s) skipped so far "
                                 f"(step {step})")
                rec["step_time_s"] = dt
                rec["samples"] = step * self.global_batch
                if flops is not None and peak is not None:
                    rec["mfu"] = flops / dt / (peak * env.world_size)
                metrics.write(rec)
                log.metrics(rec, force=step == self.steps or step == start + self.log_every)
                last_rec = rec
                sums, gnorm_sum, n_win = {}, torch.zeros((), device=self.device), 0
                t0 = time.perf_counter()
            if (self.ckpt_every and step % self.ckpt_every == 0) or step == self.steps:
                self._save(step, objective, optimizer, ema, data)
                saved_at = step
                t0 = time.perf_counter()
        assert saved_at == self.steps
        self._export(objective, ema, final)
        D.barrier(env)
        log.info(f"train-{self.kind}: done at step {self.steps}; wrote {final}")
        log.close()
        return last_rec

    # ---------------------------------------------------------------- state
    def _export(self, objective: nn.Module, ema: EMA, path: str) -> None:
        """Write ``path``: the model with the EMA in place of the trainable parameters (collective under FSDP2:
        every rank calls it, rank 0 writes)."""
        sd = ckpt_io.model_state_dict(objective, "fsdp" if self.strategy == "fsdp" else "none")
        full = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
        shadow = ema.state_dict(keep=self.env.is_main)
        if self.env.is_main:
            self.export(export_io.build_model(self.kind, self.fingerprint()["model"], full, shadow), path)

    def _save(self, step, objective, optimizer, ema, data) -> None:
        env = self.env
        model_sd = ckpt_io.model_state_dict(objective, self.strategy if self.strategy == "fsdp" else "none")
        optim_sd = ckpt_io.optimizer_state_dict(objective, optimizer)
        ema_sd = ema.state_dict(keep=env.is_main) if ema.enabled else None
        loaders = D.all_gather_object(data.state_dict(), env)
        rngs = D.all_gather_object(ckpt_io.rng_state(self.device, self.generator), env)
        if env.is_main:
            state = dict(kind=self.kind, fingerprint=self.fingerprint(), step=step, model=model_sd, ema=ema_sd,
                         optimizer=optim_sd, scheduler={"step": step}, loader=loaders,
                         rng=rngs, world_size=env.world_size)
            ckpt_io.save_checkpoint(state, os.path.join(self.out, ckpt_io.CHECKPOINT_NAME))
        D.barrier(env)

    def _resume(self, path, objective, optimizer, ema, data) -> int:
        """Every rank reads the file, except under FSDP2, where rank 0 alone does and broadcasts the tensors
        while they are sharded (a large model's full state is not held in host memory once per rank)."""
        env = self.env
        sharded = self.strategy == "fsdp"
        big = ("model", "ema", "optimizer")
        if sharded:
            ck, err = None, None
            if env.is_main:
                try:
                    ck = ckpt_io.load_checkpoint(path)
                except (ValueError, FileNotFoundError) as e:
                    err = str(e)
            D.agree(err is None, err or "", env)
            small = D.broadcast_object({k: v for k, v in ck.items() if k not in big} | {"has_ema": ck.get("ema") is not None}
                                       if env.is_main else None, env)
        else:
            ck = ckpt_io.load_checkpoint(path)
            small = {k: v for k, v in ck.items() if k not in big} | {"has_ema": ck.get("ema") is not None}
        ckpt_io.check_fingerprint(small, self.kind, self.fingerprint(), path)
        if len(small["loader"]) != env.world_size or len(small["rng"]) != env.world_size:
            raise UsageError(f"{path} was written by {len(small['loader'])} rank(s); this run has {env.world_size}")
        if ema.enabled and not small["has_ema"]:
            raise UsageError(f"{path} has no EMA state but this run uses --ema {ema.decay}")
        if sharded:
            ckpt_io.load_model_state_dict(objective, ck["model"] if env.is_main else {}, "fsdp")
            ckpt_io.load_optimizer_state_dict(objective, optimizer, ck["optimizer"] if env.is_main else {},
                                              from_rank0=True)
            ema.load_state_dict(ck["ema"] if env.is_main else None, from_rank0=True)
        else:
            ckpt_io.load_model_state_dict(objective, ck["model"], "none")
            ckpt_io.load_optimizer_state_dict(objective, optimizer, ck["optimizer"])
            ema.load_state_dict(ck["ema"])
        del ck
        data.load_state_dict(small["loader"][env.rank])
        ckpt_io.set_rng_state(small["rng"][env.rank], self.device, self.generator)
        return int(small["step"])
