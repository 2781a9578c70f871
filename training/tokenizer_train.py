"""Sequential diffusion tokenizer training (`dar-fast train-tokenizer`).

Recipe (the released one unless noted): AdamW lr 2e-4, betas (0.9, 0.95), weight decay 0, linear warmup
(500 steps; 0 for the tiny presets, ours), gradient clipping at 1.0, EMA 0.999, bf16 autocast on GPU (fp32 on
CPU), loss = flow matching + VQ (codebook + 0.25 commitment) + 0.5 LPIPS + 0.5 REPA (see losses.py). The frozen
networks come from local files: --lpips-vgg/--lpips-lin for LPIPS, --dinov2 for REPA. A term with weight 0 is
off; a positive weight without its file is an error. The tiny presets (tokenizer-tiny, digits) default both
weights to 0 because no frozen network exists at 32x32.

    torchrun --nproc_per_node=8 -m dar_fast.cli train-tokenizer --preset tokenizer_v1 --data /imagenet/train \\
        --out runs/tok --steps 400000 --batch-size 512 --lpips-vgg vgg16.pth --lpips-lin vgg.pth --dinov2 dinov2_vitb14
    dar-fast train-tokenizer --preset digits --data digits --out runs/digits-tok --steps 2000 --batch-size 64
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn as nn

from dar_fast.config import TokenizerConfig, tokenizer_config
from dar_fast.errors import UsageError
from dar_fast.models import Tokenizer
from dar_fast.training import distributed as D
from dar_fast.training.losses import TokenizerObjective
from dar_fast.training.loop import Trainer, lr_at

TINY_PRESETS = ("tokenizer-tiny", "digits")
# the released recipe where the command line leaves it open (the other settings' defaults are the CLI's)
DEFAULTS = dict(lr=2e-4, weight_decay=0.0, warmup=500, lpips_weight=0.5, repa_weight=0.5)
TINY_DEFAULTS = dict(warmup=0, lpips_weight=0.0, repa_weight=0.0)


def preset_default(preset: str, key: str):
    if preset in TINY_PRESETS and key in TINY_DEFAULTS:
        return TINY_DEFAULTS[key]
    return DEFAULTS[key]


# ====================================================================================== FLOPs

# One FLOP model for sampling, benchmarks and MFU: dar_fast.perf
from dar_fast.perf import tokenizer_forward_flops, tokenizer_train_flops  # noqa: E402,F401


# ====================================================================================== frozen networks

def load_lpips(vgg: Optional[str], lin: Optional[str], device) -> nn.Module:
    if not vgg or not lin:
        raise UsageError("--lpips-weight > 0 needs the frozen LPIPS weights: --lpips-vgg (torchvision VGG16 "
                         "state dict) and --lpips-lin (LPIPS linear layers, e.g. lpips' weights/v0.1/vgg.pth); "
                         "or pass --lpips-weight 0")
    try:
        from dar_fast.training.lpips import LPIPS
    except ImportError as e:
        raise RuntimeError(f"LPIPS support is not available in this build: {e}") from e
    net = LPIPS(vgg_path=vgg, lin_path=lin)
    return net.to(device).eval().requires_grad_(False)


def load_dino(path: Optional[str], device):
    if not path:
        raise UsageError("--repa-weight > 0 needs the frozen DINOv2-B encoder: --dinov2 (a local torch.hub "
                         "directory or a state dict); or pass --repa-weight 0")
    try:
        from dar_fast.training.dinov2 import load_dinov2
    except ImportError as e:
        raise RuntimeError(f"DINOv2 support is not available in this build: {e}") from e
    enc = load_dinov2(path)
    if isinstance(enc, nn.Module):
        enc = enc.to(device).eval().requires_grad_(False)
    elif hasattr(enc, "to"):
        enc = enc.to(device)
    return enc


# ====================================================================================== trainer

class TokenizerTrainer(Trainer):
    kind = "tokenizer"
    throughput_key = "images_per_s"

    def __init__(self, args, env: D.DistEnv):
        super().__init__(args, env)
        cfg, ckpt = training_options(tokenizer_config(args.preset))
        self.activation_checkpointing = self.activation_checkpointing or ckpt
        H, W = cfg.image_size
        if H != W:
            raise UsageError(f"tokenizer training needs square images, the config says {H}x{W}")
        self.cfg = cfg
        self.lpips_weight = _pick(args, "lpips_weight", args.preset)
        has_head = cfg.repa_head and cfg.diff_decoder.repa_layer < cfg.diff_decoder.depth
        # a config without a REPA head (the tiny ones) cannot do REPA: its default weight is 0
        self.repa_weight = _pick(args, "repa_weight", args.preset) if (has_head or args.repa_weight is not None) else 0.0
        for name, w in (("--lpips-weight", self.lpips_weight), ("--repa-weight", self.repa_weight)):
            if w < 0 or not math.isfinite(w):
                raise UsageError(f"{name} must be >= 0, got {w}")
        if self.repa_weight > 0 and (not cfg.repa_head or cfg.diff_decoder.repa_layer >= cfg.diff_decoder.depth):
            raise UsageError(f"--repa-weight {self.repa_weight} but preset {args.preset!r} has no REPA head "
                             f"(repa_head={cfg.repa_head}, repa_layer={cfg.diff_decoder.repa_layer}, "
                             f"depth={cfg.diff_decoder.depth}); pass --repa-weight 0")
        self.lpips = load_lpips(args.lpips_vgg, args.lpips_lin, self.device) if self.lpips_weight > 0 else None
        self.dino = load_dino(args.dinov2, self.device) if self.repa_weight > 0 else None
        self.base_lr = float(args.lr if args.lr is not None else DEFAULTS["lr"])
        self.warmup = int(args.warmup if args.warmup is not None else preset_default(args.preset, "warmup"))

    def describe(self) -> str:
        return (f"tokenizer {self.args.preset} ({self.num_params() / 1e6:.1f}M params, {self.cfg.image_size[0]}px, "
                f"{self.cfg.num_all_queries} tokens), lpips {self.lpips_weight}, repa {self.repa_weight}")

    def build_model(self) -> Tokenizer:
        tok = Tokenizer(self.cfg).initialize_weights()
        if getattr(self.args, "init", None):
            from dar_fast.api import load_tokenizer
            src = load_tokenizer(self.args.init)
            missing, unexpected = tok.load_state_dict(src.state_dict(), strict=False)
            bad = [k for k in missing if not k.startswith("diff_decoder.net.repa_out.")] + list(unexpected)
            if bad:
                raise UsageError(f"--init {self.args.init} does not match preset {self.args.preset!r}: {bad[:8]}")
        if tok.net.repa_out is not None and self.repa_weight == 0:
            tok.net.repa_out.requires_grad_(False)      # unused: no gradient, no optimizer state, no DDP error
        return tok

    def build_objective(self, tok: Tokenizer) -> nn.Module:
        return TokenizerObjective(tok, self.lpips, self.lpips_weight, self.dino, self.repa_weight)

    def blocks(self, tok):
        return [tok.encoder_layers, tok.decoder_layers, tok.net.blocks]

    def compute_blocks(self, tok):
        return [tok.net.blocks]          # the pixel DiT: most of the activations and of the time

    def param_groups(self, objective):
        wd = float(self.args.weight_decay if self.args.weight_decay is not None else DEFAULTS["weight_decay"])
        return [{"params": [p for p in objective.parameters() if p.requires_grad], "weight_decay": wd}]

    def build_data(self):
        from dar_fast.training.data import make_loader
        a = self.args
        augment, flip = _augment_for(a)
        return make_loader(a.data, self.cfg.image_size[0], self.rank_batch, rank=self.env.rank,
                           world_size=self.env.world_size, seed=int(a.seed), loader=a.loader, augment=augment,
                           flip=flip, device=self.device, num_workers=int(a.num_workers))

    def lr(self, step: int) -> float:
        return lr_at(step, self.base_lr, self.warmup)

    def micro_batches(self, batch):
        images, _labels = batch
        out = []
        for chunk in images.chunk(self.accum):
            x0 = torch.randn(chunk.shape, generator=self.generator, device=self.device, dtype=torch.float32)
            u = torch.rand(chunk.shape[0], generator=self.generator, device=self.device, dtype=torch.float32)
            out.append((chunk, x0, u))
        return out

    def flops_per_step(self):
        return tokenizer_train_flops(self.cfg, self.global_batch, repa=self.repa_weight > 0,
                                     grad_checkpointing=self.activation_checkpointing)

    def fingerprint(self) -> dict:
        return dict(model=self.cfg.to_dict(), global_batch=self.global_batch,
                    world_size=self.env.world_size, seed=int(self.args.seed))


def training_options(cfg: TokenizerConfig):
    """The released config's training-only key diff_decoder.grad_checkpointing is a trainer option (activation
    checkpointing of the DiT blocks, `parallelize`), not part of the model: -> (the config without it,
    whether it asked for checkpointing)."""
    dd = cfg.diff_decoder
    plain = dataclasses.replace(cfg, diff_decoder=dataclasses.replace(dd, grad_checkpointing=False))
    return plain, bool(dd.grad_checkpointing)


def _pick(args, key, preset):
    v = getattr(args, key, None)
    return float(v) if v is not None else float(preset_default(preset, key))


def _augment_for(args):
    """--augment/--flip, defaulting to the released random crop + flip for photos and to a plain centre crop
    without flips for the digits (a flipped digit is another glyph)."""
    aug = getattr(args, "augment", None)
    flip = getattr(args, "flip", None)
    digits = str(args.data).startswith("digits")
    if aug is None:
        aug = "center" if digits else "random_crop_flip"
    if flip is None:
        flip = False
    return aug, bool(flip)


def train_tokenizer(args) -> dict:
    """Run tokenizer training from parsed CLI arguments (see cli.py); returns the last metrics record."""
    return TokenizerTrainer.main(args)
