"""The stream's look-ahead (step i+1 queued before step i is handed out) and its copy-out ring: identical
StreamSteps with and without it, early close, what a consumer that stops early has paid for; on CUDA the
pinned ring is used and the results equal the CPU path."""
import pytest
import torch

from dar_fast import engine
from dar_fast.pipeline import Pipeline
from helpers import tiny_ar, tiny_tokenizer


@pytest.fixture(scope="module")
def models():
    tok = tiny_tokenizer(seed=1)
    ar = tiny_ar(seed=2, vocab_size=tok.codebook_size, block_size=tok.num_tokens)
    return tok, ar


def _run(pipe, monkeypatch, ahead: bool, **kw):
    """All StreamSteps, and a copy of each taken the moment it was yielded (later steps must not change it)."""
    monkeypatch.setenv("DAR_FAST_LOOKAHEAD", "1" if ahead else "0")
    held, snap = [], []
    for st in pipe.stream(**kw):
        held.append(st)
        snap.append((st.tokens.clone(), None if st.preview is None else st.preview.clone()))
    return held, snap


@pytest.mark.parametrize("kw", [dict(cfg=4.0, previews=True), dict(cfg=(1.1, 6.0), previews=False, steps=7),
                                dict(cfg=1.0, previews=True, steps=2, solver="euler"), dict(cfg=2.0, prefix=5),
                                dict(cfg=3.0, max_batch=2, previews=True)])
def test_lookahead_yields_identical_steps(models, monkeypatch, one_thread, kw):
    tok, ar = models
    kw = dict(kw)
    labels = [3, 0, 4]
    if kw.pop("prefix", None):
        kw["prefix_tokens"] = torch.randint(0, tok.codebook_size, (3, 5))
    pipe = Pipeline(tokenizer=tok, ar=ar)
    a, a_snap = _run(pipe, monkeypatch, False, labels=labels, seed=2, **kw)
    b, b_snap = _run(pipe, monkeypatch, True, labels=labels, seed=2, **kw)
    assert len(a) == len(b) > 1
    for x, y, (xt, xp), (yt, yp) in zip(a, b, a_snap, b_snap):
        assert (x.step, x.group, x.rows) == (y.step, y.group, y.rows)
        assert x.tokens.device.type == "cpu" and torch.equal(x.tokens, y.tokens)
        assert torch.equal(y.tokens, yt) and torch.equal(x.tokens, xt)      # not overwritten by later steps
        assert (x.preview is None) == (y.preview is None) == (yp is None)
        if y.preview is not None:
            assert torch.equal(x.preview, y.preview) and torch.equal(y.preview, yp)
    assert b[-1].preview is not None and b[-1].tokens.shape[-1] == tok.num_tokens


def _counting(pipe):
    """Count the diffusion steps the pipe's tokenizer step object runs (instance attribute, not the class)."""
    ts = next(o for k, o in pipe._engine_steps.items() if k[0] == "tokenizer")
    calls = []
    orig = ts.diffusion

    def diffusion(i, start, preview):
        calls.append(i)
        return orig(i, start, preview)
    ts.diffusion = diffusion
    return calls


@pytest.mark.parametrize("ahead", [False, True])
def test_early_close_pays_little_and_leaves_the_pipeline_usable(models, monkeypatch, one_thread, ahead):
    tok, ar = models
    monkeypatch.setenv("DAR_FAST_LOOKAHEAD", "1" if ahead else "0")
    labels = [1, 2]
    pipe = Pipeline(tokenizer=tok, ar=ar)
    full = list(pipe.stream(labels, cfg=4.0, seed=5))                  # builds the step objects
    assert len(full) >= 3
    calls = _counting(pipe)
    gen = pipe.stream(labels, cfg=4.0, seed=9)
    first = next(gen)
    assert first.step == 0
    assert calls == ([0, 1] if ahead else [0])        # a consumer that stops after step 0 paid for at most step 1
    gen.close()
    assert calls == ([0, 1] if ahead else [0])        # closing runs nothing more
    again = list(pipe.stream(labels, cfg=4.0, seed=5))
    for x, y in zip(full, again):
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.preview, y.preview)
    fresh = Pipeline(tokenizer=tok, ar=ar)
    assert torch.equal(fresh.sample(labels, cfg=4.0, seed=9).tokens, pipe.sample(labels, cfg=4.0, seed=9).tokens)


def test_lookahead_switch_and_profile(models, monkeypatch, one_thread):
    tok, ar = models
    monkeypatch.delenv("DAR_FAST_LOOKAHEAD", raising=False)
    assert engine.lookahead_default("cpu") is False and engine.lookahead_default("cuda") is True
    monkeypatch.setenv("DAR_FAST_LOOKAHEAD", "yes")
    with pytest.raises(ValueError, match="DAR_FAST_LOOKAHEAD"):
        engine.lookahead_default("cpu")
    monkeypatch.setenv("DAR_FAST_LOOKAHEAD", "1")
    assert engine.lookahead_default("cpu") is True
    prof = {}
    list(Pipeline(tokenizer=tok, ar=ar).stream([0, 1], cfg=2.0, profile=prof, previews=False))
    assert prof["ar"] > 0 and prof["tokenizer"] > 0


def _img_close(a, b):
    d = (a.int() - b.int()).abs()
    return d.max().item() <= 1 and (d > 0).float().mean().item() < 0.01


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, None])      # eager, and the CUDA default (captured)
def test_cuda_stream_uses_the_pinned_ring_and_equals_cpu(monkeypatch, compile):
    monkeypatch.delenv("DAR_FAST_LOOKAHEAD", raising=False)
    monkeypatch.delenv("DAR_FAST_ENGINE", raising=False)
    tok_c = tiny_tokenizer(seed=1)
    ar_c = tiny_ar(seed=2, vocab_size=tok_c.codebook_size, block_size=tok_c.num_tokens)
    cpu = Pipeline(tokenizer=tok_c, ar=ar_c)
    tok = tiny_tokenizer(seed=1).cuda()
    ar = tiny_ar(seed=2, vocab_size=tok.codebook_size, block_size=tok.num_tokens).cuda()
    gpu = Pipeline(tokenizer=tok, ar=ar, compile=compile)
    labels = [3, 0, 4, 1]
    for cfg in (4.0, (1.1, 6.0)):
        g = list(gpu.stream(labels, cfg=cfg, seed=1))
        c = list(cpu.stream(labels, cfg=cfg, seed=1))
        ring = next(iter(gpu._engine_out.values()))
        assert ring.cuda and all(t.is_pinned() for t in ring.tokens + ring.images)
        assert len(g) == len(c) > 1
        for x, y in zip(g, c):
            assert (x.step, x.group) == (y.step, y.group)
            assert x.tokens.device.type == "cpu" and torch.equal(x.tokens, y.tokens)
            assert x.preview.device.type == "cpu" and _img_close(x.preview, y.preview)
        assert not engine.status(gpu)["fallbacks"]
    # the ring is allocated once per step-object pair: a second call reuses it
    before = {k: id(v) for k, v in gpu._engine_out.items()}
    list(gpu.stream(labels, cfg=4.0, seed=3, previews=False))
    assert {k: id(v) for k, v in gpu._engine_out.items()} == before
