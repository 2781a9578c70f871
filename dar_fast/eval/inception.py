"""The TF-compatible InceptionV3 behind FID, sFID, Inception Score and precision/recall.

This is the 2015-12-05 TensorFlow Inception graph (`classify_image_graph_def.pb`)
that the ADM evaluator (openai/guided-diffusion `evaluations/evaluator.py`) and
TTUR run, rebuilt in PyTorch with the layer names of the ported state dict
`pt_inception-2015-12-05-6726825d.pth` (pytorch-fid; torch-fidelity ships the
same tensors as `weights-inception-2015-12-05-6726825d.pth`). It differs from
torchvision's InceptionV3 in the ways that graph does:

- 1008 classes (`fc.weight` is 1008 x 2048), no auxiliary head;
- the 3x3 average pools in the A, C and first E blocks ignore padded zeros
  (`count_include_pad=False`); the last E block (Mixed_7c) max-pools instead;
- BatchNorm eps is 1e-3;
- input: bilinear resize to 299x299 the TensorFlow 1 way (see
  `resize_bilinear_tf1`), then (x - 128) / 128 on 0..255 pixel values.

Outputs, per image (what the ADM evaluator reads from the graph):

- `pool` (2048): `pool_3:0`, the global average pool after Mixed_7c (FID,
  precision/recall);
- `logits` (1008): `pool @ fc.weight.T` WITHOUT the bias, which is what the
  ADM evaluator feeds its softmax (it multiplies pool_3 by the weight input of
  `softmax/logits/MatMul`); torch-fidelity calls these `logits_unbiased` and
  uses them for its Inception Score too. `fc.bias` is loaded but unused;
- `spatial` (2023): `mixed_6/conv:0`[..., :7] flattened. In the TF graph
  `mixed_6` is Mixed_6d and `mixed_6/conv` its 1x1 branch (BN + ReLU, 17x17x192);
  since that branch comes first in the block's channel concat, its first 7
  channels are also channels 0..6 of Mixed_6d's 768-channel output, which is
  where we take them. Flattened in NHWC order (17 * 17 * 7 = 2023, channel
  fastest), as the evaluator flattens its NHWC tensor, so statistics are
  interchangeable with the `mu_s`/`sigma_s` stored in ADM reference batches.

The weights are never downloaded: `load_inception(path)` reads a local file
and says where to get it when it is missing.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dar_fast.errors import UsageError
from dar_fast.eval.metrics import full_fp32

INCEPTION_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                 "pt_inception-2015-12-05-6726825d.pth")
INCEPTION_ENV = "DAR_FAST_INCEPTION"

IMAGE_SIZE = 299                 # the graph resizes every input to 299x299
POOL_DIM = 2048
NUM_CLASSES = 1008
SPATIAL_CHANNELS = 7             # ADM keeps mixed_6/conv[..., :7]
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023 at 299x299 input

_WHERE_TO_GET = (f"dar-fast never downloads weights: fetch {INCEPTION_FILENAME} (95.5 MB) from\n"
                 f"  {INCEPTION_URL}\n"
                 f"(torch-fidelity's weights-inception-2015-12-05-6726825d.pth holds the same tensors), then pass "
                 f"--inception PATH or set {INCEPTION_ENV}=PATH")


# ----------------------------------------------------------------------------------------------------------------
# TensorFlow-1 bilinear resize
# ----------------------------------------------------------------------------------------------------------------

def _tf1_source_coords(in_size: int, out_size: int, device) -> tuple:
    """(lower, upper, lerp) for each output index, exactly as TF1's ResizeBilinear with align_corners=False.

    TF1 maps output index i to source coordinate i * (in/out), with no half-pixel
    offset (that came in TF2 / `half_pixel_centers=True`, and is what torch's
    `interpolate(align_corners=False)` does, hence a different image). The scale
    and the coordinate are float32, as in TF's kernel.
    """
    scale = np.float32(in_size) / np.float32(out_size)                        # float32 division, like TF
    src = torch.arange(out_size, dtype=torch.float32, device=device) * float(scale)  # float32 product
    lower = src.floor()
    lerp = src - lower
    lower = lower.long()
    upper = (lower + 1).clamp_max(in_size - 1)
    return lower, upper, lerp


def resize_bilinear_tf1(x: torch.Tensor, size: tuple) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) float `x` to `size` = (H_out, W_out), as TF1 `tf.image.resize_bilinear`.

    Gathers and lerps along W first, then along H, which reproduces TF's per-pixel
    order `top = tl + (tr - tl) * xl; bottom = ...; out = top + (bottom - top) * yl`.
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"resize_bilinear_tf1 expects a float (N, C, H, W) tensor, got {tuple(x.shape)} {x.dtype}")
    h_out, w_out = size
    n, c, h, w = x.shape
    if (h, w) == (h_out, w_out):
        return x
    x0, x1, xl = _tf1_source_coords(w, w_out, x.device)
    y0, y1, yl = _tf1_source_coords(h, h_out, x.device)
    xl = xl.to(x.dtype)
    yl = yl.to(x.dtype)
    left, right = x.index_select(3, x0), x.index_select(3, x1)     # (N, C, H, W_out)
    rows = left + (right - left) * xl                               # (N, C, H, W_out)
    top, bottom = rows.index_select(2, y0), rows.index_select(2, y1)  # (N, C, H_out, W_out)
    return top + (bottom - top) * yl[:, None]


# ----------------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------------

class FrozenBatchNorm2d(nn.Module):
    """Inference BatchNorm with TF's eps 1e-3; its state is exactly weight, bias, running_mean, running_var."""

    def __init__(self, channels: int, eps: float = 1e-3):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class BasicConv2d(nn.Module):
    """conv (no bias) -> BN -> ReLU; one TF `conv` scope (conv2d_params, batchnorm, relu)."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = FrozenBatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x):
    # TF's SAME average pool divides by the number of real (unpadded) inputs.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """35x35 block (Mixed_5b/c/d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([b1, b5, b3, bp], 1)  # (N, 224 + pool_features, 35, 35)


class InceptionB(nn.Module):
    """35 -> 17 reduction (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], 1)  # (N, 768, 17, 17)


class FIDInceptionC(nn.Module):
    """17x17 block (Mixed_6b..e): 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1; 192 channels each."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)  # first in the concat: channels [0, 192) of the output
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        bd = self.branch7x7dbl_3(self.branch7x7dbl_2(bd))
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(bd))
        bp = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([b1, b7, bd, bp], 1)  # (N, 768, 17, 17)


class InceptionD(nn.Module):
    """17 -> 8 reduction (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)  # (N, 1280, 8, 8)


class FIDInceptionE(nn.Module):
    """8x8 block (Mixed_7b avg-pools, Mixed_7c max-pools, as the TF graph does): 1x1 | 1x1-(1x3,3x1) |
    1x1-3x3-(1x3,3x1) | pool-1x1."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.pool == "avg":
            bp = _avg_pool_3x3(x)
        else:
            bp = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        bp = self.branch_pool(bp)
        return torch.cat([b1, b3, bd, bp], 1)  # (N, 2048, 8, 8)


# ----------------------------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------------------------

class InceptionV3FID(nn.Module):
    """TF-compatible InceptionV3: images (N, H, W, 3) in 0..255 -> dict(pool, logits, spatial)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, c7=128)
        self.Mixed_6c = FIDInceptionC(768, c7=160)
        self.Mixed_6d = FIDInceptionC(768, c7=160)  # TF "mixed_6": sFID reads its 1x1 branch
        self.Mixed_6e = FIDInceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.fc = nn.Linear(POOL_DIM, NUM_CLASSES)
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """images: (N, H, W, 3), uint8 or float in [0, 255]. Returns float32 pool (N, 2048), logits (N, 1008)
        and spatial (N, 2023) (the spatial size is 17 * 17 * 7 because the input is always resized to 299)."""
        if images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images of shape (N, H, W, 3), got {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2).to(torch.float32)   # (N, 3, H, W)
        x = resize_bilinear_tf1(x, (IMAGE_SIZE, IMAGE_SIZE))  # (N, 3, 299, 299)
        x = (x - 128) / 128                                  # the graph's Sub 128, Mul 1/128 (a power of 2: exact)
        x = self.Conv2d_1a_3x3(x)                            # (N, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)                            # (N, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)                            # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)         # (N, 64, 73, 73)
        x = self.Conv2d_3b_1x1(x)                            # (N, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)                            # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)         # (N, 192, 35, 35)
        x = self.Mixed_5b(x)                                 # (N, 256, 35, 35)
        x = self.Mixed_5c(x)                                 # (N, 288, 35, 35)
        x = self.Mixed_5d(x)                                 # (N, 288, 35, 35)
        x = self.Mixed_6a(x)                                 # (N, 768, 17, 17)
        x = self.Mixed_6b(x)                                 # (N, 768, 17, 17)
        x = self.Mixed_6c(x)                                 # (N, 768, 17, 17)
        x = self.Mixed_6d(x)                                 # (N, 768, 17, 17)
        spatial = x[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # (N, 17*17*7) in NHWC order
        x = self.Mixed_6e(x)                                 # (N, 768, 17, 17)
        x = self.Mixed_7a(x)                                 # (N, 1280, 8, 8)
        x = self.Mixed_7b(x)                                 # (N, 2048, 8, 8)
        x = self.Mixed_7c(x)                                 # (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))                            # (N, 2048): pool_3
        logits = pool @ self.fc.weight.t()                   # (N, 1008): no bias, as the ADM evaluator
        return {"pool": pool, "logits": logits, "spatial": spatial}


# ----------------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------------

def resolve_inception_path(path: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The weights file to use: `path`, else $DAR_FAST_INCEPTION. Raises FileNotFoundError saying where to get it."""
    if path is None or str(path) == "":
        path = os.environ.get(INCEPTION_ENV) or None
    if path is None:
        raise FileNotFoundError(f"no InceptionV3 weights given (--inception PATH or {INCEPTION_ENV}).\n{_WHERE_TO_GET}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"InceptionV3 weights not found: {p}\n{_WHERE_TO_GET}")
    return p


def load_inception(path: Optional[Union[str, os.PathLike]] = None, device: Union[str, torch.device] = "cpu"
                   ) -> InceptionV3FID:
    """InceptionV3FID with the weights of the local file `path` (or $DAR_FAST_INCEPTION), in eval mode on `device`.

    Every tensor of the file must be used and every weight of the network given
    (`*.num_batches_tracked` entries, which some ports carry, are ignored);
    otherwise a ValueError names the differences.
    """
    p = resolve_inception_path(path)
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, HTML saved instead of the weights, a pickled module...
        raise UsageError(f"{p}: cannot read as a PyTorch state dict ({type(e).__name__}: {e}).\n{_WHERE_TO_GET}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{p}: expected a state dict (name -> tensor) of {INCEPTION_FILENAME}, "
                         f"got {type(state).__name__}")
    with torch.device("meta"):  # no random init of 24M weights that the file overwrites anyway
        model = InceptionV3FID()
    load_inception_state_dict(model, state, source=str(p))
    return model.to(device)


def load_inception_state_dict(model: InceptionV3FID, state: Dict[str, torch.Tensor], source: str = "state dict"):
    """Strict load that ignores `num_batches_tracked` and reports missing, unexpected and mis-shaped tensors.

    The model adopts float32 copies of the given tensors (`assign=True`, so a model
    built on the meta device becomes real), on the device they are on.
    """
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: file {tuple(state[k].shape)} vs network {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        def show(names):
            return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
        parts = [f"{source} is not the TF-Inception ({INCEPTION_FILENAME}) layout:"]
        if missing:
            parts.append(f"missing {len(missing)} tensors: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors: {show(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches: {show(shapes)}")
        raise UsageError("\n  ".join(parts))
    model.load_state_dict({k: v.to(torch.float32, copy=True).contiguous() for k, v in state.items()},
                          strict=True, assign=True)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Feature extraction
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def extract_features(images: Union[np.ndarray, torch.Tensor], inception: InceptionV3FID, batch_size: int = 100,
                     device: Union[str, torch.device, None] = None, progress: bool = True,
                     desc: str = "inception") -> Dict[str, np.ndarray]:
    """Run `inception` over `images` (N, H, W, 3) (uint8, or float in 0..255) in batches.

    Returns float32 numpy arrays: pool (N, 2048), logits (N, 1008), spatial (N, 2023).
    Each batch is copied to `device` as uint8 (4x less traffic than float) and
    converted there. The model is moved to `device` (default: where it is).
    Runs in IEEE fp32 (`full_fp32`): no TF32 convolutions on GPUs.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images of shape (N, H, W, 3), got {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device is None:
        device = next(inception.parameters()).device
    device = torch.device(device)
    model = inception.to(device).eval()
    n = images.shape[0]
    out = {"pool": np.empty((n, POOL_DIM), np.float32), "logits": np.empty((n, NUM_CLASSES), np.float32),
           "spatial": np.empty((n, SPATIAL_DIM), np.float32)}
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, total=len(starts), desc=desc, unit="batch")
    with full_fp32():
        for i in starts:
            batch = images[i:i + batch_size]
            batch = torch.from_numpy(np.ascontiguousarray(batch)) if isinstance(batch, np.ndarray) else batch
            feats = model(batch.to(device, non_blocking=True))
            for k, v in feats.items():
                out[k][i:i + len(batch)] = v.float().cpu().numpy()
    return out
