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

import torch
import torch.nn as nn

from dar_fast.config import ar_config
from dar_fast.errors import UsageError
from dar_fast.models import ARModel
from dar_fast.training import distributed as D
from dar_fast.training.data import CodeSet, CodesLoader
from dar_fast.training.losses import ARObjective
from dar_fast.training.loop import Trainer, lr_at

# the released recipe where the command line leaves it open (the other settings' defaults are the CLI's)
DEFAULTS = dict(lr=4e-4, weight_decay=0.05, warmup=0)


# ====================================================================================== FLOPs

# One FLOP model for sampling, benchmarks and MFU: dar_fast.perf
from dar_fast.perf import ar_matmul_params, ar_train_flops  # noqa: E402,F401


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
            raise UsageError(f"--class-dropout must be in [0, 1), got {a.class_dropout}")
        frac = float(a.lr_decay_frac)
        if not 0.0 <= frac <= 1.0:
            raise UsageError(f"--lr-decay-frac must be in [0, 1], got {a.lr_decay_frac}")
        self.decay_start = None if frac == 0 else int(round(self.steps * (1.0 - frac)))
        self.lr_final = float(a.lr_final)

    def describe(self) -> str:
        return (f"AR {self.args.preset} ({self.num_params() / 1e6:.1f}M params, {self.cfg.block_size} tokens, vocab "
                f"{self.cfg.vocab_size}) on {self.codeset.num_samples} coded images x {self.codeset.codes.shape[1]} aug")

    def build_model(self) -> ARModel:
        ar = ARModel(self.cfg).initialize_weights()
        if getattr(self.args, "init", None):
            from dar_fast.api import load_ar
            ar.load_state_dict(load_ar(self.args.init).state_dict(), strict=True)
        return ar

    def build_objective(self, ar: ARModel) -> nn.Module:
        return ARObjective(ar)

    def blocks(self, ar):
        return [ar.layers]

    def param_groups(self, objective):
        wd = float(self.args.weight_decay if self.args.weight_decay is not None else DEFAULTS["weight_decay"])
        ps = [p for p in objective.parameters() if p.requires_grad]
        return [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": wd},
                {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}]

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

    def units_per_step(self) -> float:
        return float(self.global_batch * self.cfg.block_size)

    def flops_per_step(self):
        return ar_train_flops(self.cfg, self.global_batch, grad_checkpointing=self.activation_checkpointing)

    def fingerprint(self) -> dict:
        return dict(model=self.cfg.to_dict(), global_batch=self.global_batch, world_size=self.env.world_size,
                    seed=int(self.args.seed), code_samples=self.codeset.num_samples)


def train_ar(args) -> dict:
    """Run AR training from parsed CLI arguments (see cli.py); returns the last metrics record."""
    return ARTrainer.main(args)
