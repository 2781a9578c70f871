"""TF-compatible InceptionV3: weight layout, loading, TF1 resize, outputs (random weights; no download)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dar_fast.eval.inception import (
    INCEPTION_ENV,
    INCEPTION_FILENAME,
    INCEPTION_URL,
    InceptionV3FID,
    extract_features,
    load_inception,
    load_inception_state_dict,
    resize_bilinear_tf1,
    resolve_inception_path,
)

from helpers import random_inception_state_dict as random_state_dict


# ---------------------------------------------------------------------------------------------------------------
# The layout of pt_inception-2015-12-05-6726825d.pth, written out from the architecture
# (torchvision's Inception3 names, 1008 classes, no AuxLogits), independently of the model code.
# ---------------------------------------------------------------------------------------------------------------

def _expected_convs():
    """(prefix, cin, cout, kh, kw) of all 94 BasicConv2d layers."""
    convs = [("Conv2d_1a_3x3", 3, 32, 3, 3), ("Conv2d_2a_3x3", 32, 32, 3, 3), ("Conv2d_2b_3x3", 32, 64, 3, 3),
             ("Conv2d_3b_1x1", 64, 80, 1, 1), ("Conv2d_4a_3x3", 80, 192, 3, 3)]
    for name, cin, pf in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        convs += [(f"{name}.branch1x1", cin, 64, 1, 1), (f"{name}.branch5x5_1", cin, 48, 1, 1),
                  (f"{name}.branch5x5_2", 48, 64, 5, 5), (f"{name}.branch3x3dbl_1", cin, 64, 1, 1),
                  (f"{name}.branch3x3dbl_2", 64, 96, 3, 3), (f"{name}.branch3x3dbl_3", 96, 96, 3, 3),
                  (f"{name}.branch_pool", cin, pf, 1, 1)]
    convs += [("Mixed_6a.branch3x3", 288, 384, 3, 3), ("Mixed_6a.branch3x3dbl_1", 288, 64, 1, 1),
              ("Mixed_6a.branch3x3dbl_2", 64, 96, 3, 3), ("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 3)]
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        convs += [(f"{name}.branch1x1", 768, 192, 1, 1), (f"{name}.branch7x7_1", 768, c7, 1, 1),
                  (f"{name}.branch7x7_2", c7, c7, 1, 7), (f"{name}.branch7x7_3", c7, 192, 7, 1),
                  (f"{name}.branch7x7dbl_1", 768, c7, 1, 1), (f"{name}.branch7x7dbl_2", c7, c7, 7, 1),
                  (f"{name}.branch7x7dbl_3", c7, c7, 1, 7), (f"{name}.branch7x7dbl_4", c7, c7, 7, 1),
                  (f"{name}.branch7x7dbl_5", c7, 192, 1, 7), (f"{name}.branch_pool", 768, 192, 1, 1)]
    convs += [("Mixed_7a.branch3x3_1", 768, 192, 1, 1), ("Mixed_7a.branch3x3_2", 192, 320, 3, 3),
              ("Mixed_7a.branch7x7x3_1", 768, 192, 1, 1), ("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7),
              ("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1), ("Mixed_7a.branch7x7x3_4", 192, 192, 3, 3)]
    for name, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
        convs += [(f"{name}.branch1x1", cin, 320, 1, 1), (f"{name}.branch3x3_1", cin, 384, 1, 1),
                  (f"{name}.branch3x3_2a", 384, 384, 1, 3), (f"{name}.branch3x3_2b", 384, 384, 3, 1),
                  (f"{name}.branch3x3dbl_1", cin, 448, 1, 1), (f"{name}.branch3x3dbl_2", 448, 384, 3, 3),
                  (f"{name}.branch3x3dbl_3a", 384, 384, 1, 3), (f"{name}.branch3x3dbl_3b", 384, 384, 3, 1),
                  (f"{name}.branch_pool", cin, 192, 1, 1)]
    return convs


def expected_layout():
    shapes = {}
    for prefix, cin, cout, kh, kw in _expected_convs():
        shapes[f"{prefix}.conv.weight"] = (cout, cin, kh, kw)
        for t in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.bn.{t}"] = (cout,)
    shapes["fc.weight"] = (1008, 2048)
    shapes["fc.bias"] = (1008,)
    return shapes


def make_weights_file(path, seed=0, with_num_batches_tracked=True):
    """A random state dict in the file's layout, built from `expected_layout`, saved like the real one."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_layout().items():
        if name.endswith("conv.weight"):
            v = torch.randn(shape, generator=g) * (2.0 / np.prod(shape[1:])) ** 0.5
        elif name.endswith("running_var"):
            v = 0.5 + torch.rand(shape, generator=g)
        elif name.endswith("bn.weight"):
            v = 0.8 + 0.4 * torch.rand(shape, generator=g)
        else:
            v = 0.1 * torch.randn(shape, generator=g)
        state[name] = v
        if with_num_batches_tracked and name.endswith("bn.running_var"):
            state[name.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    torch.save(state, path)
    return state


@pytest.fixture(scope="module")
def model_and_state(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILENAME
    state = make_weights_file(path, seed=1)
    return load_inception(path), state


def _images(n, h=32, w=32, seed=None):
    g = np.random.default_rng(seed)
    return g.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Layout and loading
# ---------------------------------------------------------------------------------------------------------------

def test_layout_matches_the_released_file():
    layout = expected_layout()
    assert len(_expected_convs()) == 94 and len(layout) == 472
    own = {k: tuple(v.shape) for k, v in InceptionV3FID().state_dict().items()}
    assert own == layout
    # torchvision's inception_v3 has 27,161,264 parameters; minus AuxLogits (3,326,696), plus 8 classes
    # (8 * 2049 = 16,392) -> 23,850,960 learned tensors (running statistics excluded).
    n = sum(int(np.prod(s)) for k, s in layout.items() if "running" not in k)
    assert n == 27_161_264 - 3_326_696 + 8 * 2049 == 23_850_960


def test_load_consumes_every_key(model_and_state):
    model, state = model_and_state
    own = model.state_dict()
    used = {k for k in state if not k.endswith("num_batches_tracked")}
    assert set(own) == used
    for k in used:
        assert torch.equal(own[k], state[k].float()), k
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_random_state_dict_helper_has_the_layout():
    assert {k: tuple(v.shape) for k, v in random_state_dict(0).items()} == expected_layout()


def test_load_without_num_batches_tracked(tmp_path):
    path = tmp_path / "w.pth"
    make_weights_file(path, with_num_batches_tracked=False)
    load_inception(path)


@pytest.mark.parametrize("damage,match", [
    ("drop", "missing 1 tensors: Mixed_6d.branch1x1.conv.weight"),
    ("extra", "unexpected 1 tensors: AuxLogits.fc.weight"),
    ("shape", "shape mismatches: fc.weight"),
])
def test_load_rejects_other_layouts(tmp_path, damage, match):
    state = random_state_dict(0)
    if damage == "drop":
        del state["Mixed_6d.branch1x1.conv.weight"]
    elif damage == "extra":
        state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    else:
        state["fc.weight"] = torch.zeros(1000, 2048)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=match):
        load_inception(path)
    with pytest.raises(ValueError, match=match):
        load_inception_state_dict(InceptionV3FID(), state)


def test_missing_weights_say_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as e:
        load_inception(tmp_path / "nope.pth")
    assert "nope.pth" in str(e.value) and INCEPTION_FILENAME in str(e.value) and INCEPTION_URL in str(e.value)
    with pytest.raises(FileNotFoundError, match=INCEPTION_ENV):
        resolve_inception_path(None)
    path = tmp_path / "w.pth"
    path.write_bytes(b"<html>not the weights</html>")
    monkeypatch.setenv(INCEPTION_ENV, str(path))
    assert resolve_inception_path(None) == path
    with pytest.raises(ValueError, match="cannot read as a PyTorch state dict"):
        load_inception()


# ---------------------------------------------------------------------------------------------------------------
# TF1 bilinear resize
# ---------------------------------------------------------------------------------------------------------------

def _resize_tf1_loop(img, out_h, out_w):
    """TF1 ResizeBilinear (align_corners=False, no half-pixel centres) one pixel at a time, float32 throughout."""
    c, h, w = img.shape
    out = np.zeros((c, out_h, out_w), np.float32)
    sy, sx = np.float32(h) / np.float32(out_h), np.float32(w) / np.float32(out_w)
    for i in range(out_h):
        fy = np.float32(i) * sy
        y0 = int(np.floor(fy))
        y1 = min(y0 + 1, h - 1)
        ly = fy - np.float32(y0)
        for j in range(out_w):
            fx = np.float32(j) * sx
            x0 = int(np.floor(fx))
            x1 = min(x0 + 1, w - 1)
            lx = fx - np.float32(x0)
            for ch in range(c):
                top = img[ch, y0, x0] + (img[ch, y0, x1] - img[ch, y0, x0]) * lx
                bottom = img[ch, y1, x0] + (img[ch, y1, x1] - img[ch, y1, x0]) * lx
                out[ch, i, j] = top + (bottom - top) * ly
    return out


@pytest.mark.parametrize("in_hw,out_hw", [((13, 17), (29, 31)), ((37, 23), (11, 7)), ((32, 32), (299, 19)),
                                          ((5, 300), (3, 299)), ((256, 40), (299, 47))])
def test_resize_tf1_matches_loop(in_hw, out_hw):
    x = torch.from_numpy(np.random.default_rng().uniform(0, 255, (2, 3, *in_hw)).astype(np.float32))
    got = resize_bilinear_tf1(x, out_hw)
    assert got.shape == (2, 3, *out_hw) and got.dtype == torch.float32
    for n in range(2):
        want = _resize_tf1_loop(x[n].numpy(), *out_hw)
        # bit-exact: same float32 coordinates and the same sub/mul/add order per pixel
        np.testing.assert_array_equal(got[n].numpy(), want)


def test_resize_tf1_is_not_half_pixel():
    x = torch.rand(1, 3, 32, 32) * 255
    ours = resize_bilinear_tf1(x, (299, 299))
    half_pixel = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    assert (ours - half_pixel).abs().max() > 1.0
    assert torch.equal(ours[..., 0, 0], x[..., 0, 0])   # TF1 maps output (0, 0) onto input (0, 0) exactly
    assert torch.equal(resize_bilinear_tf1(x, (32, 32)), x)
    const = torch.full((1, 3, 7, 9), 77.0)
    assert torch.equal(resize_bilinear_tf1(const, (299, 299)), torch.full((1, 3, 299, 299), 77.0))


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------

def test_forward_shapes_and_feature_definitions(model_and_state):
    model, state = model_and_state
    grabbed = {}
    hooks = [model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: grabbed.__setitem__("b1x1", o)),
             model.Mixed_7c.register_forward_hook(lambda m, i, o: grabbed.__setitem__("7c", o))]
    imgs = torch.from_numpy(_images(3))
    with torch.no_grad():
        out = model(imgs)
    for h in hooks:
        h.remove()
    assert out["pool"].shape == (3, 2048) and out["logits"].shape == (3, 1008) and out["spatial"].shape == (3, 2023)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out.values())
    assert grabbed["7c"].shape == (3, 2048, 8, 8) and grabbed["b1x1"].shape == (3, 192, 17, 17)
    torch.testing.assert_close(out["pool"], grabbed["7c"].mean((2, 3)))
    # logits: pool_3 @ W without the bias (the ADM evaluator's softmax input)
    torch.testing.assert_close(out["logits"], out["pool"] @ state["fc.weight"].t())
    # spatial: mixed_6/conv (Mixed_6d's 1x1 branch, ReLU output)[..., :7], flattened in NHWC order
    torch.testing.assert_close(out["spatial"], grabbed["b1x1"][:, :7].permute(0, 2, 3, 1).reshape(3, -1),
                               rtol=0, atol=0)
    assert (out["spatial"] >= 0).all()


def _reference_forward(sd, x):
    """The TF-Inception forward written functionally from the architecture, on (N, 3, 299, 299) in [-1, 1]."""
    def conv(name, x, stride=1, pad=None):
        w = sd[f"{name}.conv.weight"]
        kh, kw = w.shape[2:]
        y = F.conv2d(x, w, stride=stride, padding=((kh - 1) // 2, (kw - 1) // 2) if pad is None else pad)
        mean, var, g, b = (sd[f"{name}.bn.{t}"][:, None, None]
                           for t in ("running_mean", "running_var", "weight", "bias"))
        return ((y - mean) / torch.sqrt(var + 1e-3) * g + b).relu()

    def avg(t):
        return F.avg_pool2d(t, 3, 1, 1, count_include_pad=False)

    x = conv("Conv2d_2b_3x3", conv("Conv2d_2a_3x3", conv("Conv2d_1a_3x3", x, 2, 0), 1, 0))
    x = conv("Conv2d_4a_3x3", conv("Conv2d_3b_1x1", F.max_pool2d(x, 3, 2)), 1, 0)
    x = F.max_pool2d(x, 3, 2)
    for m in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = torch.cat([conv(f"{m}.branch1x1", x), conv(f"{m}.branch5x5_2", conv(f"{m}.branch5x5_1", x)),
                       conv(f"{m}.branch3x3dbl_3", conv(f"{m}.branch3x3dbl_2", conv(f"{m}.branch3x3dbl_1", x))),
                       conv(f"{m}.branch_pool", avg(x))], 1)
    m = "Mixed_6a"
    x = torch.cat([conv(f"{m}.branch3x3", x, 2, 0),
                   conv(f"{m}.branch3x3dbl_3", conv(f"{m}.branch3x3dbl_2", conv(f"{m}.branch3x3dbl_1", x)), 2, 0),
                   F.max_pool2d(x, 3, 2)], 1)
    for m in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        b7 = conv(f"{m}.branch7x7_3", conv(f"{m}.branch7x7_2", conv(f"{m}.branch7x7_1", x)))
        bd = x
        for i in range(1, 6):
            bd = conv(f"{m}.branch7x7dbl_{i}", bd)
        x = torch.cat([conv(f"{m}.branch1x1", x), b7, bd, conv(f"{m}.branch_pool", avg(x))], 1)
        if m == "Mixed_6d":
            spatial = x[:, :7].permute(0, 2, 3, 1).flatten(1)
    m = "Mixed_7a"
    b7 = x
    for i in range(1, 4):
        b7 = conv(f"{m}.branch7x7x3_{i}", b7)
    x = torch.cat([conv(f"{m}.branch3x3_2", conv(f"{m}.branch3x3_1", x), 2, 0),
                   conv(f"{m}.branch7x7x3_4", b7, 2, 0), F.max_pool2d(x, 3, 2)], 1)
    for m, pool in (("Mixed_7b", avg), ("Mixed_7c", lambda t: F.max_pool2d(t, 3, 1, 1))):
        b3 = conv(f"{m}.branch3x3_1", x)
        bd = conv(f"{m}.branch3x3dbl_2", conv(f"{m}.branch3x3dbl_1", x))
        x = torch.cat([conv(f"{m}.branch1x1", x), conv(f"{m}.branch3x3_2a", b3), conv(f"{m}.branch3x3_2b", b3),
                       conv(f"{m}.branch3x3dbl_3a", bd), conv(f"{m}.branch3x3dbl_3b", bd),
                       conv(f"{m}.branch_pool", pool(x))], 1)
    pool3 = x.mean((2, 3))
    return {"pool": pool3, "logits": pool3 @ sd["fc.weight"].t(), "spatial": spatial}


def test_forward_matches_functional_reference(model_and_state):
    model, state = model_and_state
    imgs = torch.from_numpy(_images(1, 299, 299))  # 299: the resize is the identity, tested on its own above
    with torch.no_grad():
        got = model(imgs)
        want = _reference_forward(state, (imgs.permute(0, 3, 1, 2).float() - 128) / 128)
    for k in want:  # BN written as (x - mean) / sqrt(var + eps) * g + b rounds differently: seen <= 3e-6 of max|.|
        assert (got[k] - want[k]).abs().max() <= 2e-5 * want[k].abs().max(), k


def test_forward_deterministic_and_dtype_invariant(model_and_state):
    model, _ = model_and_state
    imgs = torch.from_numpy(_images(1, 40, 24))
    with torch.no_grad():
        a, b, c = model(imgs), model(imgs), model(imgs.float())
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k])


def test_forward_batch_invariant(model_and_state):
    model, _ = model_and_state
    imgs = _images(4)
    whole = extract_features(imgs, model, batch_size=4, progress=False)
    pieces = extract_features(imgs, model, batch_size=3, progress=False)  # batches of 3 and 1
    for k in whole:
        assert whole[k].dtype == np.float32 and whole[k].shape[0] == 4
        # other batch sizes take other conv / matmul blockings: float32 round-off only. Measured max|diff| /
        # max|value| <= 1e-6 (logits, 2048-term dot products); pool and spatial came out bit-equal
        assert np.abs(pieces[k] - whole[k]).max() <= 1e-5 * np.abs(whole[k]).max(), k


def test_extract_features_rejects_bad_shapes(model_and_state):
    model, _ = model_and_state
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        extract_features(np.zeros((2, 3, 8, 8), np.uint8), model, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        extract_features(np.zeros((2, 8, 8, 3), np.uint8), model, batch_size=0, progress=False)


@pytest.mark.gpu
def test_cuda_features_match_cpu(model_and_state):
    model, _ = model_and_state
    imgs = _images(6, 64, 48)
    cpu = extract_features(imgs, model, batch_size=6, device="cpu", progress=False)
    gpu = extract_features(imgs, model, batch_size=4, device="cuda", progress=False)
    model.to("cpu")
    for k in cpu:
        np.testing.assert_allclose(gpu[k], cpu[k], rtol=1e-3, atol=1e-3)
