"""The streaming engine equals the reference sampler; previews, keys, prefixes, schedules, errors."""
import pytest
import torch

from dar_fast import engine, ops
from dar_fast.engine_graphs import DecodeStep
from dar_fast.pipeline import Pipeline
from dar_fast.sampler import reference_sample
from dar_fast.sampling_args import cfg_schedule
from dar_fast.seeding import resolve_keys, sample_noise
from helpers import tiny_ar, tiny_tokenizer


@pytest.fixture(scope="module")
def models():
    tok = tiny_tokenizer(seed=1)
    ar = tiny_ar(seed=2, vocab_size=tok.codebook_size, block_size=tok.num_tokens)
    return tok, ar, Pipeline(tokenizer=tok, ar=ar)


def _img_close(a, b):
    """uint8 images equal up to float rounding at truncation boundaries: at most 1 apart, rarely."""
    d = (a.int() - b.int()).abs()
    return d.max().item() <= 1 and (d > 0).float().mean().item() < 0.01


@pytest.mark.parametrize("cfg,kw", [(4.0, {}), ((1.1, 6.0), {}), (1.0, {}),
                                    (3.0, dict(temperature=0.7, top_k=5)), (2.0, dict(top_p=0.8))])
def test_engine_equals_reference(models, cfg, kw):
    tok, ar, pipe = models
    labels = [0, 3, 4, 1]
    ref = reference_sample(tok, ar, labels, cfg=cfg, seed=11, **kw)
    out = pipe.sample(labels, cfg=cfg, seed=11, **kw)
    assert torch.equal(out.tokens, ref.tokens)
    assert out.images.dtype == torch.uint8 and out.images.shape == (4, *tok.image_size, 3)
    assert _img_close(out.images, ref.images)


@pytest.mark.parametrize("static", [False, True])
def test_engine_equals_reference_with_grouped_query_attention_and_rope_base(static, monkeypatch):
    """The engine's own decode block (one KV head for three query heads, rope_base 1000, odd head count) gives
    the reference sampler's tokens; `static` runs the capture variant (device-side length) eagerly."""
    tok = tiny_tokenizer(seed=3)
    ar = tiny_ar(seed=4, dim=96, n_head=3, n_kv_head=1, rope_base=1000.0, n_layer=3,
                 vocab_size=tok.codebook_size, block_size=tok.num_tokens)
    monkeypatch.setattr(DecodeStep, "static", static)
    pipe = Pipeline(tokenizer=tok, ar=ar)
    labels = [1, 4, 0]
    for cfg in (3.0, 1.0):
        ref = reference_sample(tok, ar, labels, cfg=cfg, seed=7)
        assert torch.equal(pipe.sample(labels, cfg=cfg, seed=7).tokens, ref.tokens), cfg


def test_previews_equal_decode_with_the_engine_noise(models):
    tok, ar, pipe = models
    labels = [2, 0, 4]
    steps = list(pipe.stream(labels, cfg=4.0, seed=5))
    assert [s.group for s in steps] == list(range(tok.num_groups))
    seeds, ids = resolve_keys(5, 3)
    noise = sample_noise(seeds, ids, (3, *tok.image_size))
    final = steps[-1].tokens
    for s in steps:
        assert s.tokens.shape == (3, (s.group + 1) * tok.group_size)
        assert torch.equal(s.tokens, final[:, :s.tokens.shape[1]])
        ref = ops.images_to_uint8(tok.decode(final, noise=noise, groups=s.group + 1))
        assert _img_close(s.preview, ref), s.group
    assert torch.equal(steps[-1].preview, pipe.sample(labels, cfg=4.0, seed=5).images)


def test_batch_invariance_and_determinism(models):
    tok, ar, pipe = models
    labels = torch.tensor([1, 4, 2, 0, 3])
    full = pipe.sample(labels, cfg=(1.5, 5.0), seed=3)
    again = pipe.sample(labels, cfg=(1.5, 5.0), seed=3)
    assert torch.equal(full.tokens, again.tokens) and torch.equal(full.images, again.images)
    # sample i of seed 3 has key (3, i): alone, or in another batch in another order
    for i in (0, 3):
        alone = pipe.sample(labels[i:i + 1], cfg=(1.5, 5.0), seed=[3], sample_ids=[i])
        assert torch.equal(alone.tokens[0], full.tokens[i])
        assert _img_close(alone.images[0:1], full.images[i:i + 1])
    perm = torch.tensor([4, 2, 0, 3, 1])
    shuffled = pipe.sample(labels[perm], cfg=(1.5, 5.0), seed=[3] * 5, sample_ids=perm)
    assert torch.equal(shuffled.tokens, full.tokens[perm])
    # a different seed gives different samples
    assert not torch.equal(pipe.sample(labels, cfg=(1.5, 5.0), seed=4).tokens, full.tokens)


def test_prefix_tokens_are_kept(models):
    tok, ar, pipe = models
    labels = [0, 1]
    images = torch.rand(2, 3, *tok.image_size) * 2 - 1
    prefix = pipe.prefix_from_image(images, 6)
    assert torch.equal(prefix, tok.encode(images)[:, :6])
    out = pipe.sample(labels, cfg=3.0, seed=1, prefix_tokens=prefix)
    assert torch.equal(out.tokens[:, :6], prefix)
    assert torch.equal(out.tokens, reference_sample(tok, ar, labels, cfg=3.0, seed=1, prefix_tokens=prefix).tokens)
    # a full prefix: no AR step at all, the image is the decode of the given tokens
    full = pipe.sample(labels, cfg=3.0, seed=1, prefix_tokens=out.tokens)
    assert torch.equal(full.tokens, out.tokens) and torch.equal(full.images, out.images)


def test_cfg_schedule_is_linspace():
    s = cfg_schedule((1.1, 10.0), 256)
    assert torch.allclose(s, torch.linspace(1.1, 10.0, 256))
    assert s[0].item() == pytest.approx(1.1) and s[-1].item() == pytest.approx(10.0)
    assert cfg_schedule(1.0, 8) is None and torch.equal(cfg_schedule(2.0, 3), torch.full((3,), 2.0))


def test_schedule_is_what_the_engine_uses(models, monkeypatch):
    """Record the scale the engine passes for every position."""
    tok, ar, pipe = models
    seen = {}
    real = DecodeStep._sample

    def spy(self, c, u, scale, positions):      # the engine's one call into the sampler per token
        seen[int(positions.flatten()[0])] = float(scale.flatten()[0])
        return real(self, c, u, scale, positions)

    monkeypatch.setattr(DecodeStep, "_sample", spy)
    pipe.sample([0], cfg=(1.1, 10.0), seed=0)
    expect = torch.linspace(1.1, 10.0, tok.num_tokens)
    assert sorted(seen) == list(range(tok.num_tokens))
    assert all(abs(seen[j] - expect[j].item()) < 1e-6 for j in seen)


def test_errors(models):
    tok, ar, pipe = models
    with pytest.raises(ValueError, match="class labels out of range"):
        pipe.sample([ar.num_classes])
    with pytest.raises(ValueError, match="class labels out of range"):
        pipe.sample([-1])
    with pytest.raises(ValueError, match="cfg scale must be >= 0"):
        pipe.sample([0], cfg=-1.0)
    with pytest.raises(ValueError, match="longer than N"):
        pipe.sample([0], prefix_tokens=torch.zeros(1, tok.num_tokens + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="out of the codebook"):
        pipe.sample([0], prefix_tokens=torch.full((1, 2), tok.codebook_size))
    bad_ar = tiny_ar(vocab_size=tok.codebook_size + 1, block_size=tok.num_tokens)
    with pytest.raises(ValueError, match="vocabulary"):
        Pipeline(tokenizer=tok, ar=bad_ar)
    with pytest.raises(ValueError, match="generates"):
        Pipeline(tokenizer=tok, ar=tiny_ar(vocab_size=tok.codebook_size, block_size=tok.num_tokens * 2))


def test_profile_split(models):
    tok, ar, pipe = models
    prof = {}
    list(pipe.stream([0, 1], cfg=2.0, profile=prof, previews=False))
    assert prof["ar"] > 0 and prof["tokenizer"] > 0


@pytest.mark.gpu
def test_cuda_graphs_equal_eager_float32():
    tok = tiny_tokenizer(seed=1).cuda()
    ar = tiny_ar(seed=2, vocab_size=tok.codebook_size, block_size=tok.num_tokens).cuda()
    fast = Pipeline(tokenizer=tok, ar=ar, use_cuda_graphs=True)
    eager = Pipeline(tokenizer=tok, ar=ar, compile=False)
    assert fast.engine_mode == "captured" and eager.engine_mode == "eager"
    labels = [0, 1, 2, 3]
    for cfg in (4.0, (1.1, 6.0)):
        a, b = fast.sample(labels, cfg=cfg, seed=1), eager.sample(labels, cfg=cfg, seed=1)
        st = engine.status(fast)
        assert not st["fallbacks"] and {o["mode"] for o in st["objects"]} == {"captured"}, st
        assert torch.equal(a.tokens, b.tokens)
        assert _img_close(a.images, b.images)
    # and equal to the CPU reference
    cpu = reference_sample(tiny_tokenizer(seed=1), tiny_ar(seed=2, vocab_size=tok.codebook_size,
                                                          block_size=tok.num_tokens), labels, cfg=4.0, seed=1)
    assert torch.equal(fast.sample(labels, cfg=4.0, seed=1).tokens, cpu.tokens)


def test_capture_variant_on_cpu(models):
    """The step the CUDA graph replays (device-side position and length, no host ints), run eagerly on CPU:
    the same tokens as the reference and the same images as the plain engine."""
    tok, ar, plain = models
    static = Pipeline(tokenizer=tok, ar=ar)
    labels = [3, 0, 4]
    prefix = torch.randint(0, tok.codebook_size, (3, 5))
    for kw in (dict(cfg=4.0), dict(cfg=(1.1, 6.0), top_k=5), dict(cfg=1.0), dict(cfg=2.0, prefix_tokens=prefix)):
        list(static.stream(labels, seed=2, previews=False, **kw))             # builds the step objects
        for o in static._engine_steps.values():
            o.static = True
        a, b = static.sample(labels, seed=2, **kw), plain.sample(labels, seed=2, **kw)
        assert torch.equal(a.tokens, b.tokens), kw
        assert torch.equal(a.tokens, reference_sample(tok, ar, labels, seed=2, **kw).tokens), kw
        assert torch.equal(a.images, b.images)


@pytest.mark.parametrize("steps,solver", [(None, "euler"), (2, None), (7, "adams2"), (3, "euler")])
def test_steps_and_solver(models, steps, solver):
    """S diffusion steps (fewer or more than the K groups), either solver: one StreamStep per step whose
    preview is Tokenizer.decode(clip_steps=i+1); tokens equal the reference; the final image its decode."""
    tok, ar, pipe = models
    labels = [1, 2]
    S = steps or tok.cfg.num_denoising_steps
    out = list(pipe.stream(labels, cfg=3.0, seed=4, steps=steps, solver=solver))
    times, groups = tok.schedule(steps)
    assert [s.step for s in out] == list(range(S)) and [s.group for s in out] == groups
    ref = reference_sample(tok, ar, labels, cfg=3.0, seed=4)
    assert torch.equal(out[-1].tokens, ref.tokens)
    seeds, ids = resolve_keys(4, 2)
    noise = sample_noise(seeds, ids, (3, *tok.image_size))
    for s in out[:-1]:
        assert s.tokens.shape[1] >= (s.group + 1) * tok.group_size
        assert torch.equal(s.tokens, ref.tokens[:, :s.tokens.shape[1]])
    for s in out:
        img = tok.decode(ref.tokens, noise=noise, steps=S, solver=solver or "adams2", clip_steps=s.step + 1)
        assert _img_close(s.preview, ops.images_to_uint8(img)), s.step
    final = pipe.sample(labels, cfg=3.0, seed=4, steps=steps, solver=solver)
    assert torch.equal(final.images, out[-1].preview) and torch.equal(final.tokens, ref.tokens)
    with pytest.raises(ValueError, match="solver"):
        pipe.sample(labels, solver="heun")
    with pytest.raises(ValueError, match="steps"):
        pipe.sample(labels, steps=0)


def test_results_are_not_overwritten_by_the_next_call(models):
    """The engine's buffers are static: what a call returned must be a copy."""
    tok, ar, pipe = models
    a = pipe.sample([0, 1], cfg=2.0, seed=1)
    keep_t, keep_i = a.tokens.clone(), a.images.clone()
    pipe.sample([2, 3], cfg=2.0, seed=9)
    assert torch.equal(a.tokens, keep_t) and torch.equal(a.images, keep_i)
