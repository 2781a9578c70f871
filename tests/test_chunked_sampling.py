"""Bounded memory: Pipeline.sample/stream cut any number of labels into chunks with results identical to one batch."""
import re

import numpy as np
import pytest
import torch

from dar_fast import batching, engine
from dar_fast.errors import UsageError
from dar_fast.pipeline import Pipeline
from helpers import tiny_ar, tiny_tokenizer

MICRO = dict(sampling_resolution=8, encoder_patch_size=8, num_encoder_layers=1, num_decoder_layers=1,
             num_denoising_steps=2, num_query_groups=2, num_all_queries=4, queries_per_step=2, vq_codebook_size=16,
             diff_decoder=dict(dim=64, cond_dim=64, patch_size=8, depth=1))


@pytest.fixture(scope="module")
def pipe():
    tok = tiny_tokenizer(seed=1)
    ar = tiny_ar(seed=2, vocab_size=tok.codebook_size, block_size=tok.num_tokens)
    return Pipeline(tokenizer=tok, ar=ar)


@pytest.fixture(scope="module")
def micro():
    """8x8 images, 4 tokens, one layer each: the smallest model the configs allow (~0.6 ms a sample on one core)."""
    tok = tiny_tokenizer(seed=1, **MICRO)
    ar = tiny_ar(seed=2, dim=64, n_layer=1, n_head=1, vocab_size=tok.codebook_size, block_size=tok.num_tokens)
    return Pipeline(tokenizer=tok, ar=ar)


def _peak_rss_reset():
    with open("/proc/self/clear_refs", "w") as f:      # resets VmHWM (peak RSS) to the current RSS (Linux >= 4.0)
        f.write("5")


def _kib(field):
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1))


def test_chunks_identical_to_one_batch(pipe):
    labels = [i % 5 for i in range(13)]
    one = pipe.sample(labels, cfg=2.0, seed=7, max_batch=13)
    for mb in (1, 4, 12):
        part = pipe.sample(labels, cfg=2.0, seed=7, max_batch=mb)
        assert torch.equal(part.tokens, one.tokens), mb
        d = (part.images.int() - one.images.int()).abs()
        assert d.max() <= 1 and (d > 0).float().mean() < 0.01, mb     # pixels: float rounding across batch sizes


def test_chunks_keep_given_keys_and_prefix(pipe):
    labels = [3, 1, 4, 1, 0]
    ids, seeds = [100, 7, 55, 3, 9], [5, 5, 6, 6, 7]
    prefix = torch.tensor([2, 9])
    one = pipe.sample(labels, cfg=(1.0, 3.0), seed=seeds, sample_ids=ids, prefix_tokens=prefix, max_batch=5)
    two = pipe.sample(labels, cfg=(1.0, 3.0), seed=seeds, sample_ids=ids, prefix_tokens=prefix, max_batch=2)
    assert torch.equal(one.tokens, two.tokens) and (one.tokens[:, :2] == prefix).all()


def test_stream_in_chunks_says_which_rows(pipe):
    steps = list(pipe.stream([0, 1, 2, 3, 4], cfg=2.0, max_batch=2, previews=True))
    rows = [s.rows for s in steps]
    S = len(steps) // 3
    assert rows == [(0, 2)] * S + [(2, 4)] * S + [(4, 5)] * S
    assert all(s.preview.shape[0] == s.rows[1] - s.rows[0] for s in steps)
    assert all(s.rows is None for s in pipe.stream([0, 1], cfg=2.0, max_batch=2))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_max_batch_refused(pipe, bad):
    with pytest.raises(UsageError, match="max_batch must be an integer >= 1"):
        pipe.sample([0, 1], max_batch=bad)


def test_default_max_batch_from_memory(pipe, monkeypatch):
    per = batching.estimate_sample_bytes(pipe.tok, pipe.ar)
    assert per > 0
    monkeypatch.setattr(batching, "free_bytes", lambda device: 10 * per + 1)
    assert batching.default_max_batch(pipe.tok, pipe.ar) == 10
    monkeypatch.setattr(batching, "free_bytes", lambda device: 1)
    assert batching.default_max_batch(pipe.tok, pipe.ar) == 1
    monkeypatch.setattr(batching, "free_bytes", lambda device: 1 << 50)
    assert batching.default_max_batch(pipe.tok, pipe.ar) == batching.CPU_CAP


def test_estimate_for_d_ar_l_counts_its_kv_cache():
    from dar_fast.config import AR_PRESETS
    from dar_fast.models import ARModel
    with torch.device("meta"):
        ar = ARModel(AR_PRESETS["D-AR-L"]()).to(torch.bfloat16)
    tok = tiny_tokenizer(seed=1)
    kv = 24 * 257 * 1024 * 2 * 2 * 2           # layers x slots x dim x (K,V) x bf16 bytes x CFG rows = 50.5 MB
    est = batching.estimate_sample_bytes(tok, ar)
    assert 2 * kv <= est < 4 * kv


def test_100k_labels_bounded_memory_fast(micro, monkeypatch):
    """100,000 labels through the real chunking code; the engine stands in with a fake that holds, like the real
    one, ~5 KB of working memory per sample in its batch (the micro model's KV cache and activations)."""
    seen = []
    real_stream = engine.stream

    def fake(pipe, labels, seeds, ids, *a, **k):
        seen.append(labels.numel())
        work = torch.ones(labels.numel(), 1280)           # 5 KB a sample, touched: resident
        N = pipe.tok.num_tokens
        tokens = (ids[:, None] * 7 + seeds[:, None] + torch.arange(N)) % pipe.tok.codebook_size
        images = (labels[:, None, None, None] * 40 + ids[:, None, None, None] % 7).to(torch.uint8)
        yield engine.StreamStep(step=0, group=0, tokens=tokens, preview=images.expand(-1, 8, 8, 3) + int(work[0, 0]))
    monkeypatch.setattr(engine, "stream", fake)
    B = 100_000
    labels = np.arange(B) % 5
    _peak_rss_reset()
    rss0 = _kib("VmRSS")
    out = micro.sample(labels, cfg=2.0, seed=3, max_batch=1000)
    grew_mib = (_kib("VmHWM") - rss0) / 1024
    assert max(seen) == 1000 and sum(seen) == B and len(seen) == 100
    assert out.images.shape == (B, 8, 8, 3) and out.tokens.shape == (B, 4)
    assert torch.equal(out.images[:, 0, 0, 0], torch.from_numpy(labels * 40 + 1 + np.arange(B) % 7).to(torch.uint8))
    assert torch.equal(out.tokens[:, 0], torch.from_numpy((np.arange(B) * 7 + 3) % 16))
    # output 100k x (192 B images + 32 B tokens) = 22 MB; one batch would hold 100k x 5 KB = 512 MB of work
    assert grew_mib < 150, grew_mib
    monkeypatch.setattr(engine, "stream", real_stream)


@pytest.mark.slow
def test_100k_labels_real_engine_under_memory_cap(micro):
    """The real engine on 100,000 labels (about a minute on one core): peak memory growth stays far below what
    one batch would take, and a sample of the result equals the same labels generated on their own."""
    B = 100_000
    labels = np.arange(B) % 5
    _peak_rss_reset()
    rss0 = _kib("VmRSS")
    out = micro.sample(labels, cfg=2.0, seed=3, max_batch=2000)
    grew_mib = (_kib("VmHWM") - rss0) / 1024
    assert out.images.shape == (B, 8, 8, 3)
    print(f"peak RSS growth {grew_mib:.0f} MiB")
    assert grew_mib < 300, grew_mib
    pick = [0, 1999, 2000, 54321, B - 1]
    alone = micro.sample(labels[pick], cfg=2.0, seed=[3] * len(pick), sample_ids=pick)
    assert torch.equal(alone.tokens, out.tokens[pick])
