"""The engine's step functions: zero graph breaks under torch.compile, the compiled engine equals the reference,
the capture-safe decode attention equals SDPA over the used prefix."""
import pytest
import torch
import torch.nn.functional as F

from dar_fast import engine
from dar_fast.engine_graphs import _decode_attention_op, decode_attention
from dar_fast.pipeline import Pipeline
from dar_fast.sampler import reference_sample
from helpers import tiny_ar, tiny_tokenizer


@pytest.fixture(scope="module")
def built():
    tok = tiny_tokenizer(seed=1)
    ar = tiny_ar(seed=2, vocab_size=tok.codebook_size, block_size=tok.num_tokens)
    pipe = Pipeline(tokenizer=tok, ar=ar)
    list(pipe.stream([0, 1], cfg=4.0, seed=1, previews=False))          # builds the step objects
    dec = next(o for k, o in pipe._engine_steps.items() if k[0] == "decode")
    ts = next(o for k, o in pipe._engine_steps.items() if k[0] == "tokenizer")
    return tok, ar, pipe, dec, ts


def test_step_functions_have_no_graph_breaks(built):
    """torch._dynamo traces each step function into exactly one graph (the sampler op stays in it)."""
    import torch._dynamo as dyn
    tok, ar, pipe, dec, ts = built
    dyn.reset()
    with torch.no_grad():
        dec.pos.fill_(3)
        for fn, arg in ((dec.step, 5), (dec.step_static, None), (ts.cond_step, 2 * tok.group_size),
                        (ts.diffusion_step_preview, 2 * tok.group_size), (ts.diffusion_step, 2 * tok.group_size)):
            e = dyn.explain(fn)(*([] if arg is None else [arg]))
            assert e.graph_break_count == 0 and e.graph_count == 1, (fn.__name__, e.break_reasons)
            if fn is dec.step or fn is dec.step_static:
                dec.pos.fill_(3)
                ops = [str(n.target) for g in e.graphs for n in g.graph.nodes if n.op == "call_function"]
                assert any("dar_fast.sample_tokens" in o for o in ops), "the keyed sampler left the graph"
    dyn.reset()


def test_decode_attention_reads_the_device_length():
    """The capture variant's attention (length on the device) equals SDPA over the used prefix; odd sizes."""
    torch.manual_seed(0)
    R, H, L, hd = 3, 2, 37, 24
    q = torch.randn(R, H, 1, hd)
    k, v = torch.randn(R, H, L, hd), torch.randn(R, H, L, hd)
    for n in (1, 5, 37):
        ref = F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n])
        out = decode_attention(q, k, v, torch.tensor([n]))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_decode_attention_op_runs_the_triton_kernel_interpreted(monkeypatch):
    """The custom-op wrapper around the Triton decode kernel (what CUDA graphs replay), run by the Triton
    interpreter on CPU: equal to SDPA over the prefix."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("DAR_FAST_BACKEND_DECODE_ATTENTION", "triton")
    torch.manual_seed(1)
    R, H, L, hd = 3, 2, 21, 16
    q = torch.randn(R, H, 1, hd)
    k, v = torch.randn(R, H, L, hd), torch.randn(R, H, L, hd)
    n = 13
    out = _decode_attention_op(q[:, :, 0], k, v, torch.tensor(n))[:, :, None]
    ref = F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_modes_and_status(monkeypatch, built):
    tok, ar, pipe, dec, ts = built
    assert pipe.engine_mode == "eager"                                  # CPU default: compiling costs tens of seconds
    assert Pipeline(tokenizer=tok, ar=ar, compile=True).engine_mode == "compiled"
    monkeypatch.setenv("DAR_FAST_ENGINE", "captured")
    with pytest.raises(ValueError, match="CUDA"):
        Pipeline(tokenizer=tok, ar=ar)
    monkeypatch.setenv("DAR_FAST_ENGINE", "fast")
    with pytest.raises(ValueError, match="DAR_FAST_ENGINE"):
        Pipeline(tokenizer=tok, ar=ar)
    st = engine.status(pipe)
    assert st["mode"] == "eager" and st["fallbacks"] == [] and {o["mode"] for o in st["objects"]} == {"eager"}


@pytest.mark.slow
def test_compiled_engine_equals_reference():
    """torch.compile (inductor, CPU) of both step functions: tokens identical to the reference, images equal
    to the eager engine's up to float rounding; no fallback. Slow: compiling takes minutes on 2 shared cores."""
    tok = tiny_tokenizer(seed=1)
    ar = tiny_ar(seed=2, vocab_size=tok.codebook_size, block_size=tok.num_tokens)
    comp = Pipeline(tokenizer=tok, ar=ar, compile=True)
    eager = Pipeline(tokenizer=tok, ar=ar)
    labels = [0, 3, 4, 1]
    prefix = torch.randint(0, tok.codebook_size, (4, 5), generator=torch.Generator().manual_seed(0))
    for kw in (dict(cfg=4.0), dict(cfg=(1.1, 6.0), top_k=5, top_p=0.9, temperature=0.8),
               dict(cfg=2.0, prefix_tokens=prefix, steps=3, solver="euler")):
        a = comp.sample(labels, seed=7, **kw)
        ref = reference_sample(tok, ar, labels, seed=7, **{k: v for k, v in kw.items() if k not in ("steps", "solver")})
        assert torch.equal(a.tokens, ref.tokens), kw
        b = eager.sample(labels, seed=7, **kw)
        d = (a.images.int() - b.images.int()).abs()
        assert d.max() <= 1 and (d > 0).float().mean() < 0.01, kw
    st = engine.status(comp)
    assert st["fallbacks"] == [] and {o["mode"] for o in st["objects"]} == {"compiled"}, st


def test_fused_weights_follow_the_parameters():
    """The merged q/k/v and w1/w3 copies (inference only) equal the separate layers, keep the released state-dict
    keys, and are rebuilt when the parameters change (here: load_state_dict of another model's weights)."""
    tok = tiny_tokenizer(seed=1)
    ar = tiny_ar(seed=2, vocab_size=tok.codebook_size, block_size=tok.num_tokens)
    assert not any(".qkv." in k or "w13" in k for k in list(tok.state_dict()) + list(ar.state_dict()))
    x = torch.randn(2, 5, ar.cfg.dim)
    ff = ar.layers[0].feed_forward
    plain = lambda: ff.w2(F.silu(ff.w1(x)) * ff.w3(x))           # noqa: E731  (the released FeedForward)
    with torch.no_grad():
        torch.testing.assert_close(ff(x), plain(), rtol=1e-5, atol=1e-6)
        other = tiny_ar(seed=9, vocab_size=tok.codebook_size, block_size=tok.num_tokens)
        ar.load_state_dict(other.state_dict())
        torch.testing.assert_close(ff(x), plain(), rtol=1e-5, atol=1e-6)
        a = tok.decoder_layers[0].attention
        h = torch.randn(2, 7, a.dim)
        q, k, v = a.project(h)
        torch.testing.assert_close(v, a.v(h).view(2, 7, a.num_heads, a.head_dim))
        a.v.weight.mul_(2.0)
        torch.testing.assert_close(a.project(h)[2], a.v(h).view(2, 7, a.num_heads, a.head_dim))
    # with gradients the separate parameters are used (training sees the released layers)
    ff(x).sum().backward()
    assert ff.w1.weight.grad is not None and ff.w3.weight.grad is not None
