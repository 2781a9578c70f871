"""DINOv2 for REPA: hub key layout, position-embedding interpolation, REPA preprocessing and loss."""
import math

import pytest
import torch
import torch.nn.functional as F

from dar_fast.training.dinov2 import ARCHS, DINOv2, load_dinov2
from dar_fast.training.losses import cosine_repa_loss


def repa_loss(pred, target):
    """REPA's -cos form of the trainer's loss (1 - cos)."""
    return cosine_repa_loss(pred, target) - 1.0


def _hub_shapes(D, depth, grid=37, patch=14, registers=0, mlp=4):
    """The official hub state dict of a DINOv2 ViT/14, written out by hand."""
    s = {"cls_token": (1, 1, D), "pos_embed": (1, 1 + grid * grid, D), "mask_token": (1, D),
         "patch_embed.proj.weight": (D, 3, patch, patch), "patch_embed.proj.bias": (D,),
         "norm.weight": (D,), "norm.bias": (D,)}
    if registers:
        s["register_tokens"] = (1, registers, D)
    for i in range(depth):
        b = f"blocks.{i}."
        s.update({b + "norm1.weight": (D,), b + "norm1.bias": (D,),
                  b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
                  b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,), b + "ls1.gamma": (D,),
                  b + "norm2.weight": (D,), b + "norm2.bias": (D,),
                  b + "mlp.fc1.weight": (mlp * D, D), b + "mlp.fc1.bias": (mlp * D,),
                  b + "mlp.fc2.weight": (D, mlp * D), b + "mlp.fc2.bias": (D,), b + "ls2.gamma": (D,)})
    return s


def _random_state(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        t = torch.randn(*shape, generator=g) * 0.02
        if k.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            t += 1
        if k.endswith("gamma"):
            t = t.abs() * 5 + 0.1
        sd[k] = t
    return sd


TINY = dict(embed_dim=48, depth=2, num_heads=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("dino")
    sd = _random_state(_hub_shapes(48, 2))
    torch.save(sd, d / "dinov2_vitb14_pretrain.pth")
    return str(d), sd


def test_vitb14_hub_layout_loads_every_key(tmp_path):
    """The real ViT-B/14 shapes: every key of a hub-layout file is consumed; one forward at 224."""
    shapes = _hub_shapes(768, 12)
    with torch.device("meta"):
        assert set(DINOv2(**ARCHS["vitb14"]).state_dict()) == set(shapes)
    sd = {k: (torch.rand(*v) * 0.04 - 0.02).half() for k, v in shapes.items()}      # half: a smaller file
    torch.save(sd, tmp_path / "dinov2_vitb14_pretrain.pth")
    m = load_dinov2(str(tmp_path), "vitb14")
    own = m.state_dict()
    assert all(v.dtype == torch.float32 for v in own.values())
    assert own.keys() == sd.keys()
    assert all(own[k].shape == sd[k].shape and torch.equal(own[k], sd[k].float()) for k in sd)
    assert m.pos_embed.shape == (1, 1 + 37 * 37, 768)
    assert m.patch_features(torch.zeros(1, 3, 256, 256)).shape == (1, 256, 768)


def test_load_from_file_dir_and_hub_dir(tiny, tmp_path):
    d, sd = tiny
    for src in (d, d + "/dinov2_vitb14_pretrain.pth"):
        m = load_dinov2(src, "vitb14", **TINY)
        assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())
    (tmp_path / "checkpoints").mkdir()
    torch.save(sd, tmp_path / "checkpoints" / "dinov2_vitb14_pretrain.pth")
    load_dinov2(str(tmp_path), "vitb14", **TINY)


def test_registers_detected(tmp_path):
    sd = _random_state(_hub_shapes(48, 2, registers=4))
    torch.save(sd, tmp_path / "dinov2_vitb14_reg4_pretrain.pth")
    m = load_dinov2(str(tmp_path), "vitb14", **TINY)
    assert m.num_register_tokens == 4
    assert m.patch_features(torch.zeros(2, 3, 64, 64)).shape == (2, 256, 48)
    # registers do not take position embeddings and are dropped from the patch tokens
    x = (torch.rand(1, 3, 224, 224) - 0.5)
    full = m.forward_features(x)
    assert full.shape == (1, 1 + 4 + 256, 48)


def test_errors(tiny, tmp_path):
    d, sd = tiny
    with pytest.raises(FileNotFoundError, match="not found"):
        load_dinov2(str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="no dinov2_vitb14"):
        load_dinov2(str(tmp_path))
    with pytest.raises(ValueError, match="unknown DINOv2 arch"):
        load_dinov2(d, "vitg14")
    bad = dict(sd)
    del bad["blocks.1.ls2.gamma"]
    bad["extra.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "x.pth")
    with pytest.raises(ValueError, match=r"missing \['blocks.1.ls2.gamma'\], unexpected \['extra.weight'\]"):
        load_dinov2(str(tmp_path / "x.pth"), "vitb14", **TINY)
    with pytest.raises(ValueError, match="shape mismatches"):
        load_dinov2(d, "vitb14", embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0)


def _reference_forward(sd, x, heads, depth):
    """A functional ViT from the state dict, with DINOv2's pos-embed interpolation written out."""
    D = sd["cls_token"].shape[-1]
    B, _, H, W = x.shape
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(B, -1, -1), t], 1)
    M = int(math.sqrt(sd["pos_embed"].shape[1] - 1))
    h0, w0 = H // 14, W // 14
    pp = sd["pos_embed"][:, 1:].reshape(1, M, M, D).permute(0, 3, 1, 2)
    pp = F.interpolate(pp, scale_factor=((h0 + 0.1) / M, (w0 + 0.1) / M), mode="bicubic")
    t = t + torch.cat([sd["pos_embed"][:, :1], pp.permute(0, 2, 3, 1).reshape(1, -1, D)], 1)
    for i in range(depth):
        p = lambda n: sd[f"blocks.{i}.{n}"]  # noqa: E731
        y = F.layer_norm(t, (D,), p("norm1.weight"), p("norm1.bias"), 1e-6)
        q, k, v = F.linear(y, p("attn.qkv.weight"), p("attn.qkv.bias")).reshape(B, -1, 3, heads, D // heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // heads), -1) @ v
        a = F.linear(a.transpose(1, 2).reshape(B, -1, D), p("attn.proj.weight"), p("attn.proj.bias"))
        t = t + p("ls1.gamma") * a
        y = F.layer_norm(t, (D,), p("norm2.weight"), p("norm2.bias"), 1e-6)
        y = F.gelu(F.linear(y, p("mlp.fc1.weight"), p("mlp.fc1.bias")))
        y = F.linear(y, p("mlp.fc2.weight"), p("mlp.fc2.bias"))
        t = t + p("ls2.gamma") * y
    return F.layer_norm(t, (D,), sd["norm.weight"], sd["norm.bias"], 1e-6)


def test_patch_features_match_reference(tiny):
    d, sd = tiny
    m = load_dinov2(d, "vitb14", **TINY)
    img = torch.rand(2, 3, 40, 56) * 2 - 1                  # odd, non-square input: resized to 224 like REPA
    out = m.patch_features(img)
    assert out.shape == (2, 256, 48) and not out.requires_grad
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = F.interpolate(((img + 1) / 2 - mean) / std, size=(224, 224), mode="bicubic")
    torch.testing.assert_close(out, _reference_forward(sd, x, 3, 2)[:, 1:], rtol=1e-4, atol=1e-4)
    # the 518 input uses the stored pos_embed as is; a 14*20 one interpolates to a 20x20 grid
    assert m.interpolate_pos_encoding(518, 518, torch.float32) is not None
    assert m.interpolate_pos_encoding(280, 280, torch.float32).shape == (1, 401, 48)
    assert m.patch_features(img, resolution=448).shape == (2, 1024, 48)


def test_frozen(tiny):
    m = load_dinov2(tiny[0], "vitb14", **TINY)
    assert not any(p.requires_grad for p in m.parameters())
    m.train()
    assert not m.training


def test_repa_loss():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 256, 64, generator=g)
    assert torch.allclose(repa_loss(t.clone(), t), torch.tensor(-1.0), atol=1e-6)
    assert torch.allclose(repa_loss(2.5 * t, t), torch.tensor(-1.0), atol=1e-6)   # cosine: scale-free
    assert torch.allclose(repa_loss(-t, t), torch.tensor(1.0), atol=1e-6)
    pred = torch.randn(3, 256, 64, generator=g)
    expect = -F.cosine_similarity(pred, t, dim=-1).mean(dim=1).mean()             # REPA: per sample, then batch
    torch.testing.assert_close(repa_loss(pred, t), expect)
    pred.requires_grad_()
    target = t.clone().requires_grad_()
    repa_loss(pred, target).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert target.grad is None
    with pytest.raises(ValueError, match="differ"):
        repa_loss(pred, t[:, :10])
