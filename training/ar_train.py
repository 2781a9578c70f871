"""AR model training on extracted codes (`dar-fast train-ar`).

Recipe: next-token cross-entropy; the class label replaced by the null class with probability 0.1 (CFG);
AdamW lr 4e-4, betas (0.9, 0.95), weight decay 0.05 on matrices only (norms, biases and nothing else
excluded, as LlamaGen), gradient clipping 1.0, constant lr then a linear decay to 1e-5 over the last
``--lr-decay-frac`` of the steps (the released run decays over its last 60k of 360k steps, 1/6), bf16 autocast
on GPU, optional per-block torch.compile and activation checkpointing. ``--batch-size`` is the global batch:
world_size x ``--grad-accum`` micro-batches.

    dar-fast extract-codes --tokenizer tok.safetensors --data /imagenet/train --out codes/ --flip
    torchrun --nproc_per_node=8 -m dar_fast.cli train-ar --preset D-AR-L --codes codes/ --out runs/ar \\
        --steps 360000 --batch-size 256
"""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from dar_fast.config import ARConfig, ar_config
from dar_fast.models import ARModel
from dar_fast.training import distributed as D
from dar_fast.training.extract_codes import CODES_NAME, LABELS_NAME, META_NAME
from dar_fast.training.losses import ARObjective
from dar_fast.training.loop import Trainer, lr_at

DEFAULTS = dict(lr=4e-4, betas=(0.9, 0.95), weight_decay=0.05, warmup=0, grad_clip=1.0, ema=0.999,
                class_dropout=0.1, lr_final=1e-5, lr_decay_frac=1 / 6)


# ====================================================================================== init

@torch.no_grad()
def init_ar_weights_(ar: ARModel) -> ARModel:
    """LlamaGen initialisation: Linear and Embedding weights normal(0, initializer_range), zero biases, the
    output projection zeroed (the model starts at the uniform distribution). Global torch RNG."""
    std = ar.cfg.initializer_range
    for m in ar.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
    nn.init.zeros_(ar.output.weight)
    return ar


# ====================================================================================== FLOPs

def ar_matmul_params(cfg: ARConfig) -> int:
    """Parameters that take part in a matmul per token: blocks and the output head (not the embedding tables)."""
    D_, hd = cfg.dim, cfg.head_dim
    per_layer = D_ * (cfg.n_head + 2 * cfg.kv_heads) * hd + D_ * D_ + 3 * D_ * cfg.ffn_hidden
    return cfg.n_layer * per_layer + D_ * cfg.vocab_size


def ar_train_flops(cfg: ARConfig, sequences: int, seq_len: Optional[int] = None,
                   grad_checkpointing: bool = False) -> float:
    """PaLM-style count per step: 6 x matmul params x tokens + attention 12 x layers x dim x T per token
    (scores and values, forward + backward, the full T x T square as PaLM counts it). With activation
    checkpointing the blocks' forward runs twice (8 instead of 6)."""
    T = seq_len or cfg.block_size
    mult = 8 if grad_checkpointing else 6
    dense = mult * ar_matmul_params(cfg) * T
    attn = (mult * 2) * cfg.n_layer * cfg.dim * T * T
    return float((dense + attn) * sequences)


# ====================================================================================== codes on disk

class CodeSet:
    """A directory written by `dar-fast extract-codes`: codes (M, A, N) int16/int32 memory-mapped, labels (M,)
    int64 (-1 marks an image that could not be decoded), meta.json."""

    def __init__(self, path: str):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"code directory not found: {path} (write one with dar-fast extract-codes)")
        mpath = os.path.join(path, META_NAME)
        if not os.path.exists(mpath):
            raise ValueError(f"{path} is not a finished code directory (no {META_NAME}); run dar-fast extract-codes")
        try:
            with open(mpath) as f:
                self.meta = json.load(f)
            self.codes = np.load(os.path.join(path, CODES_NAME), mmap_mode="r")
            self.labels = np.load(os.path.join(path, LABELS_NAME))
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read the codes in {path}: {e}") from e
        if self.codes.ndim != 3 or self.labels.shape != (self.codes.shape[0],):
            raise ValueError(f"{path}: codes {self.codes.shape} / labels {self.labels.shape} are not (M, A, N) / (M,)")
        self.path = path
        self.valid = np.flatnonzero(self.labels >= 0)
        if len(self.valid) == 0:
            raise ValueError(f"{path} holds no usable codes")

    @property
    def num_tokens(self) -> int:
        return int(self.codes.shape[2])

    @property
    def num_samples(self) -> int:
        return int(len(self.valid))

    def check(self, cfg: ARConfig) -> None:
        m = self.meta
        if self.num_tokens != cfg.block_size:
            raise ValueError(f"codes have {self.num_tokens} tokens per image; the AR config expects block_size "
                             f"{cfg.block_size} (choose a preset that matches the tokenizer)")
        cb = int(m.get("codebook_size", 0))
        if cb != cfg.vocab_size:
            raise ValueError(f"codes come from a codebook of {cb}; the AR config has vocab_size {cfg.vocab_size}")
        lo, hi = int(m.get("code_min", 0)), int(m.get("code_max", cb - 1))
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"codes out of range [{lo}, {hi}] for vocab_size {cfg.vocab_size}")
        top = int(self.labels.max())
        if top >= cfg.num_classes:
            raise ValueError(f"labels go up to {top} but the AR config has num_classes {cfg.num_classes}")


class CodesLoader:
    """Endless, resumable batches (codes (B,N) int64, labels (B,) int64) of one rank.

    Epoch e is a permutation of the usable rows (data.epoch_permutation(seed, e)); rank r takes positions
    r::world of its first (n // (B*world)) * B*world entries; each row's augmentation (flip or not, when
    extracted with --flip) is drawn per epoch from (seed, e). state_dict() = (epoch, index)."""

    def __init__(self, cs: CodeSet, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 device="cpu"):
        self.cs, self.batch_size, self.rank, self.world_size, self.seed = cs, int(batch_size), rank, world_size, seed
        self.device = torch.device(device)
        n, step = cs.num_samples, self.batch_size * world_size
        if n < step:
            raise ValueError(f"the code set has {n} samples, fewer than one global batch "
                             f"({self.batch_size} x {world_size} ranks = {step}); lower --batch-size")
        self.num_samples = n
        self.per_rank = (n // step) * self.batch_size
        self.steps_per_epoch = self.per_rank // self.batch_size
        self.num_aug = int(cs.codes.shape[1])
        self.epoch, self.index = 0, 0
        self._cache_epoch, self._rows, self._augs = None, None, None

    def _epoch_tables(self, epoch: int):
        if self._cache_epoch != epoch:
            from dar_fast.training.data import epoch_permutation
            perm = epoch_permutation(self.seed, epoch, self.num_samples).numpy()
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch * 7919 + 17) & ((1 << 63) - 1))
            augs = torch.randint(self.num_aug, (self.num_samples,), generator=g).numpy()
            mine = perm[self.rank::self.world_size][: self.per_rank]
            self._rows, self._augs = self.cs.valid[mine], augs[mine]
            self._cache_epoch = epoch
        return self._rows, self._augs

    def __iter__(self):
        return self

    def __next__(self):
        rows, augs = self._epoch_tables(self.epoch)
        sl = slice(self.index, self.index + self.batch_size)
        r, a = rows[sl], augs[sl]
        order = np.argsort(r, kind="stable")             # sequential reads from the memory map
        codes = np.empty((len(r), self.cs.num_tokens), dtype=np.int64)
        codes[order] = self.cs.codes[r[order], a[order]]
        labels = self.cs.labels[r].astype(np.int64)
        self.index += self.batch_size
        if self.index >= self.per_rank:
            self.epoch, self.index = self.epoch + 1, 0
        nb = self.device.type == "cuda"
        return (torch.from_numpy(codes).to(self.device, non_blocking=nb),
                torch.from_numpy(labels).to(self.device, non_blocking=nb))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "world_size": self.world_size,
                "batch_size": self.batch_size, "num_samples": self.num_samples, "rank": self.rank}

    def load_state_dict(self, sd: dict) -> None:
        for k in ("seed", "world_size", "batch_size", "num_samples"):
            if sd.get(k) != getattr(self, k):
                raise ValueError(f"code loader state was saved with {k}={sd.get(k)!r}, this loader has "
                                 f"{getattr(self, k)!r}: the sample order would not continue")
        self.epoch, self.index = int(sd["epoch"]), int(sd["index"])


# ====================================================================================== trainer

class ARTrainer(Trainer):
    kind = "ar"
    throughput_key = "tokens_per_s"

    def __init__(self, args, env: D.DistEnv):
        super().__init__(args, env)
        self.cfg = ar_config(args.preset)
        self.codeset = CodeSet(args.codes)
        self.codeset.check(self.cfg)
        a = args
        self.base_lr = float(a.lr if a.lr is not None else DEFAULTS["lr"])
        self.warmup = int(a.warmup if a.warmup is not None else DEFAULTS["warmup"])
        # released: the config's class_dropout_prob (default 0.1) unless the command line overrides it
        self.class_dropout = float(a.class_dropout if a.class_dropout is not None else self.cfg.class_dropout_prob)
        if not 0.0 <= self.class_dropout < 1.0:
            raise ValueError(f"--class-dropout must be in [0, 1), got {a.class_dropout}")
        frac = float(a.lr_decay_frac)
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"--lr-decay-frac must be in [0, 1], got {a.lr_decay_frac}")
        self.decay_start = None if frac == 0 else int(round(self.steps * (1.0 - frac)))
        self.lr_final = float(a.lr_final)

    def describe(self) -> str:
        n = sum(p.numel() for p in self.model.parameters()) if hasattr(self, "model") else 0
        return (f"AR {self.args.preset} ({n / 1e6:.1f}M params, {self.cfg.block_size} tokens, vocab "
                f"{self.cfg.vocab_size}) on {self.codeset.num_samples} coded images x {self.codeset.codes.shape[1]} aug")

    def build_model(self) -> ARModel:
        ar = init_ar_weights_(ARModel(self.cfg))
        if getattr(self.args, "init", None):
            from dar_fast.api import load_ar
            ar.load_state_dict(load_ar(self.args.init).state_dict(), strict=True)
        return ar

    def build_objective(self, ar: ARModel) -> nn.Module:
        if getattr(self.args, "compile", False):
            for layer in ar.layers:
                layer.compile()
        return ARObjective(ar, grad_checkpointing=bool(getattr(self.args, "grad_checkpointing", False)))

    def fsdp_blocks(self, ar):
        return [ar.layers]

    def param_groups(self, objective):
        wd = float(self.args.weight_decay if self.args.weight_decay is not None else DEFAULTS["weight_decay"])
        ps = [p for p in objective.parameters() if p.requires_grad]
        return [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": wd},
                {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}]

    def build_optimizer(self, groups):
        return torch.optim.AdamW(groups, lr=self.base_lr, betas=DEFAULTS["betas"],
                                 **_fused(self.device, self.strategy))

    def build_data(self):
        return CodesLoader(self.codeset, self.rank_batch, self.env.rank, self.env.world_size, int(self.args.seed),
                           self.device)

    def lr(self, step: int) -> float:
        return lr_at(step, self.base_lr, self.warmup, self.decay_start, self.steps, self.lr_final)

    def micro_batches(self, batch):
        codes, labels = batch
        if self.class_dropout > 0:
            drop = torch.rand(labels.shape[0], generator=self.generator, device=self.device) < self.class_dropout
            labels = torch.where(drop, torch.full_like(labels, self.cfg.num_classes), labels)
        return list(zip(codes.chunk(self.accum), labels.chunk(self.accum)))

    def forward(self, wrapped, micro):
        return wrapped(*micro)

    def units_per_step(self) -> float:
        return float(self.global_batch * self.cfg.block_size)

    def flops_per_step(self):
        return ar_train_flops(self.cfg, self.global_batch,
                              grad_checkpointing=bool(getattr(self.args, "grad_checkpointing", False)))

    def fingerprint(self) -> dict:
        return dict(model=self.cfg.to_dict(), global_batch=self.global_batch, world_size=self.env.world_size,
                    seed=int(self.args.seed), code_samples=self.codeset.num_samples)

    def export(self, model_sd, path: str) -> None:
        from dar_fast.api import save_ar
        ar = ARModel(self.cfg)
        ar.load_state_dict(model_sd, strict=True)
        save_ar(ar, path)


def _fused(device, strategy) -> dict:
    # fused AdamW on plain CUDA tensors; the foreach default for FSDP2's DTensor shards and on CPU
    return {"fused": True} if device.type == "cuda" and strategy != "fsdp" else {}


def train_ar(args) -> dict:
    env = D.init_distributed(getattr(args, "device", "auto"))
    try:
        return ARTrainer(args, env).run()
    finally:
        D.shutdown(env)
