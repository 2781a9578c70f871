"""LPIPS-VGG: key layouts of the two weight files, the metric's properties, and an independent reference."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from dar_fast.training.lpips import LPIPS, LPIPS_CHANNELS

# torchvision vgg16 "features": (index, out, in) of the 13 convolutions.
CONVS = [(0, 64, 3), (2, 64, 64), (5, 128, 64), (7, 128, 128), (10, 256, 128), (12, 256, 256), (14, 256, 256),
         (17, 512, 256), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512), (28, 512, 512)]
CLASSIFIER = {"classifier.0.weight": (4096, 25088), "classifier.0.bias": (4096,), "classifier.3.weight": (4096, 4096),
              "classifier.3.bias": (4096,), "classifier.6.weight": (1000, 4096), "classifier.6.bias": (1000,)}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random weights in the exact layouts of torchvision's vgg16-397923af.pth and lpips' weights/v0.1/vgg.pth."""
    g = torch.Generator().manual_seed(0)
    vgg = {}
    for i, co, ci in CONVS:
        vgg[f"features.{i}.weight"] = torch.randn(co, ci, 3, 3, generator=g) * (2.0 / (9 * ci)) ** 0.5
        vgg[f"features.{i}.bias"] = torch.randn(co, generator=g) * 0.01
    for k, shape in CLASSIFIER.items():          # the full file has these too; stored as 1-element expands
        vgg[k] = torch.zeros(1).expand(*shape)
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) * 0.1 for k, c in enumerate(LPIPS_CHANNELS)}
    d = tmp_path_factory.mktemp("lpips")
    torch.save(vgg, d / "vgg16.pth")
    torch.save(lin, d / "lin.pth")
    return str(d / "vgg16.pth"), str(d / "lin.pth"), vgg, lin


@pytest.fixture(scope="module")
def model(weights):
    return LPIPS(weights[0], weights[1])


def _reference(vgg, lin, x, y):
    """LPIPS v0.1 written out functionally from the paper's recipe and torchvision's vgg16 config."""
    shift = torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1)
    scale = torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)

    def taps(z):
        z, out = (z - shift) / scale, []
        for n, (i, _, _) in enumerate(CONVS):
            z = F.relu(F.conv2d(z, vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"], padding=1))
            if n in (1, 3, 6, 9, 12):             # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
                out.append(z)
            if n in (1, 3, 6, 9):
                z = F.max_pool2d(z, 2)
        return out

    total = 0
    for k, (a, b) in enumerate(zip(taps(x), taps(y))):
        a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + (F.conv2d((a - b) ** 2, lin[f"lin{k}.model.1.weight"])).mean(dim=(2, 3))
    return total.flatten()


def _images(b, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


def test_every_key_consumed(weights, model):
    _, _, vgg, lin = weights
    sd = model.state_dict()
    feats = {k for k in vgg if k.startswith("features.")}
    assert {k[len("vgg."):] for k in sd if k.startswith("vgg.")} == feats
    assert {k for k in sd if k.startswith("lin")} == set(lin)
    assert set(sd) == {"vgg." + k for k in feats} | set(lin)
    for k in feats:
        assert torch.equal(sd["vgg." + k], vgg[k])
    for k in lin:
        assert torch.equal(sd[k], lin[k])


def test_frozen(model):
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training


def test_matches_reference(weights, model):
    _, _, vgg, lin = weights
    x, y = _images(3, 21, 27, 1), _images(3, 21, 27, 2)
    out = model(x, y)
    assert out.shape == (3,)
    torch.testing.assert_close(out, _reference(vgg, lin, x, y), rtol=1e-4, atol=1e-6)


def test_identity_and_symmetry(model):
    x, y = _images(2, 20, 26, 3), _images(2, 20, 26, 4)
    assert torch.equal(model(x, x), torch.zeros(2))
    d_xy, d_yx = model(x, y), model(y, x)
    assert (d_xy > 0).all()
    torch.testing.assert_close(d_xy, d_yx, rtol=1e-5, atol=1e-7)


def test_gradient_reaches_the_input(model):
    x, y = _images(2, 24, 24, 5).requires_grad_(), _images(2, 24, 24, 6)
    model(x, y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_missing_or_wrong_files(weights, tmp_path):
    vgg_path, lin_path, vgg, lin = weights
    with pytest.raises(FileNotFoundError, match="VGG16 weights"):
        LPIPS(str(tmp_path / "none.pth"), lin_path)
    with pytest.raises(FileNotFoundError, match="LPIPS linear-layer weights"):
        LPIPS(vgg_path, None)
    torch.save({k: v for k, v in lin.items() if k != "lin4.model.1.weight"}, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="lin4.model.1.weight"):
        LPIPS(vgg_path, str(tmp_path / "short.pth"))
    torch.save({**vgg, "features.28.weight": torch.zeros(512, 256, 3, 3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="features.28.weight"):
        LPIPS(str(tmp_path / "bad.pth"), lin_path)
    with pytest.raises(ValueError, match="backend"):
        LPIPS(vgg_path, lin_path, backend="alex")


@pytest.mark.skipif(importlib.util.find_spec("lpips") is None,
                    reason="the lpips package is not installed (it needs torchvision); the built-in route is "
                           "checked against the functional reference above instead")
def test_matches_lpips_package(weights, model):
    vgg_path, lin_path, _, _ = weights
    pkg = LPIPS(vgg_path, lin_path, backend="lpips")
    x, y = _images(2, 64, 64, 7), _images(2, 64, 64, 8)
    torch.testing.assert_close(model(x, y), pkg(x, y), rtol=1e-4, atol=1e-6)
