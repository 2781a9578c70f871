"""LPIPS (VGG16, v0.1) perceptual loss, frozen, for tokenizer training.

Two routes, same numbers:
- built-in (default): written here, no torchvision needed. VGG16 ``features`` in torchvision's layout
  (``features.0.weight`` ... ``features.28.bias``), so torchvision's ``vgg16-397923af.pth`` loads by its keys
  (its ``classifier.*`` keys are ignored); taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3; LPIPS' scaling
  layer; channel-unit normalisation; squared difference; 1x1 heads ``lin0..lin4`` with the keys of the lpips
  package's ``weights/v0.1/vgg.pth`` (``lin0.model.1.weight`` ...); spatial mean; sum over the five layers.
- ``backend="lpips"``: the ``lpips`` package itself (needs torchvision), with the same two weight files.

Inputs are images in [-1, 1], (B, 3, H, W); the output is the per-sample distance (B,).

    loss_fn = LPIPS("weights/vgg16-397923af.pth", "weights/lpips_vgg_v0.1.pth").to(device)
    loss = loss_fn(recon, target).mean()
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch
import torch.nn as nn

from dar_fast.errors import MissingPackage, UsageError

__all__ = ["LPIPS", "VGG16Features", "VGG16_CONVS", "LPIPS_TAPS", "LPIPS_CHANNELS"]

# torchvision vgg16 "D" config: conv widths, "M" = 2x2 max-pool. Index = position in ``features``.
_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
LPIPS_TAPS = (3, 8, 15, 22, 29)                  # features indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def _features_layers():
    layers, c_in = [], 3
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=False)]
            c_in = v
    return layers                                  # 30 modules: features.0 .. features.29 (the last pool is not needed)


VGG16_CONVS = tuple(i for i, m in enumerate(_features_layers()) if isinstance(m, nn.Conv2d))


class VGG16Features(nn.Module):
    """torchvision ``vgg16().features[:30]`` returning the five LPIPS taps."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(*_features_layers())

    def forward(self, x):
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in LPIPS_TAPS:
                taps.append(x)
        return taps


class _Lin(nn.Module):
    """lpips' NetLinLayer: ``model = Sequential(Dropout, Conv2d(C, 1, 1, bias=False))``; dropout is moot here
    (frozen, eval), so slot 0 is an Identity and the key stays ``model.1.weight``."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x):
        return self.model(x)


def _load_state(path: Optional[str], what: str) -> Dict[str, torch.Tensor]:
    if path is None:
        raise FileNotFoundError(f"LPIPS needs the {what}; pass its local path")
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return sd


def _check_keys(sd, own, path, what, ignore_prefix=()):
    used = {k: v for k, v in sd.items() if not k.startswith(ignore_prefix)}
    missing = sorted(set(own) - set(used))
    unexpected = sorted(set(used) - set(own))
    bad = [f"{k}: file {tuple(used[k].shape)} vs {tuple(own[k].shape)}" for k in own
           if k in used and used[k].shape != own[k].shape]
    if missing or unexpected or bad:
        raise UsageError(f"{path} is not the {what}: missing {missing[:6]}, unexpected {unexpected[:6]}, "
                         f"shape mismatches {bad[:6]}")
    return used


_VGG_WHAT = "VGG16 weights (torchvision vgg16-397923af.pth layout: features.N.weight/bias)"
_LIN_WHAT = "LPIPS linear-layer weights (lpips weights/v0.1/vgg.pth: lin0.model.1.weight ... lin4.model.1.weight)"


class LPIPS(nn.Module):
    """LPIPS-VGG v0.1 distance between images in [-1, 1]: (B, 3, H, W) x 2 -> (B,). Frozen."""

    def __init__(self, vgg_path: Optional[str], lin_path: Optional[str], backend: str = "builtin"):
        super().__init__()
        if backend not in ("builtin", "lpips"):
            raise UsageError(f"unknown LPIPS backend {backend!r}; choose 'builtin' or 'lpips'")
        vgg = VGG16Features()
        lins = nn.ModuleDict({f"lin{k}": _Lin(c) for k, c in enumerate(LPIPS_CHANNELS)})
        vgg_sd = _check_keys(_load_state(vgg_path, _VGG_WHAT), vgg.state_dict(), vgg_path, _VGG_WHAT,
                             ignore_prefix=("classifier.",))
        lin_sd = _check_keys(_load_state(lin_path, _LIN_WHAT), lins.state_dict(), lin_path, _LIN_WHAT)
        self.backend = backend
        if backend == "lpips":
            self._init_package(vgg_sd, lin_path)
        else:
            vgg.load_state_dict(vgg_sd, strict=True)
            lins.load_state_dict(lin_sd, strict=True)
            self.vgg = vgg
            self.lin0, self.lin1, self.lin2, self.lin3, self.lin4 = (lins[f"lin{k}"] for k in range(5))
            self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def _init_package(self, vgg_sd, lin_path):
        try:
            import lpips
        except ImportError as e:
            raise MissingPackage("backend='lpips' needs the lpips package (pip install lpips; it needs torchvision); "
                              "the default backend='builtin' needs neither") from e
        # pnet_rand: do not download torchvision's VGG; our file goes into its slices instead.
        self.impl = lpips.LPIPS(net="vgg", version="0.1", pretrained=True, model_path=lin_path, pnet_rand=True,
                                verbose=False)
        bounds = [0] + [t + 1 for t in LPIPS_TAPS]
        mapped = {}
        for k, v in vgg_sd.items():
            idx = int(k.split(".")[1])
            s = next(n for n in range(5) if bounds[n] <= idx < bounds[n + 1])
            mapped[f"slice{s + 1}.{idx}.{k.split('.')[2]}"] = v
        self.impl.net.load_state_dict(mapped, strict=True)

    def train(self, mode: bool = True):
        """Frozen: stays in eval mode whatever a parent module asks."""
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise UsageError(f"LPIPS expects two (B, 3, H, W) images of one shape, got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
        if self.backend == "lpips":
            return self.impl(x, y).flatten()
        B = x.shape[0]
        z = (torch.cat([x, y]) - self.shift) / self.scale                # both images in one pass: (2B, 3, H, W)
        total = 0
        for k, f in enumerate(self.vgg(z)):
            # unit length over channels, as lpips' normalize_tensor; vector_norm's backward is 0 (not NaN) where
            # a position's features are all zero, which sqrt(sum(f^2)) is not
            f = f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + 1e-10)
            d = (f[:B] - f[B:]) ** 2                                               # (B, C, h, w)
            total = total + getattr(self, f"lin{k}")(d).mean(dim=(2, 3))           # (B, 1)
        return total.flatten()
