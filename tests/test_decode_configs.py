"""Decode configurations (steps, solver, clip_steps, sizes, output_resolution, precision) against plain loops
written here from the released semantics, on fresh random tiny tokenizers."""
import dataclasses
import math
import random
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

import dar_fast
from dar_fast.errors import UsageError
from dar_fast.models import Tokenizer
from dar_fast.models.diffusion import step_groups, step_query_starts
from conftest import rel_err
from helpers import randomize_, tiny_tokenizer, tiny_tokenizer_config


def _shift(u, s):
    return u / (u + s * (1 - u))


def _plain_decode(tok, codes, noise, S, solver, clip):
    """The released sampler written out: u_i = i/S (float64, then float32), shifted; step i reads group
    floor(i*K/S + 1/2) (capped at K-1); the last of `clip` steps goes to t = 1; Euler or AB2; x / data_std."""
    K, G, shift = tok.num_groups, tok.group_size, tok.cfg.diff_decoder.time_shift
    n = S if clip is None else min(S, clip)
    u = torch.tensor([i / S for i in range(n)] + [1.0], dtype=torch.float32)
    t = _shift(u, shift)
    cond = tok.cond(codes)
    x, v_prev = noise.float(), None
    for i in range(n):
        g = min(math.floor(Fraction(i * K, S) + Fraction(1, 2)), K - 1)
        v = tok.net(x.to(tok.dtype), t[i].repeat(x.shape[0]), cond[:, g * G:(g + 1) * G]).float()
        d = v if (v_prev is None or solver == "euler") else 1.5 * v - 0.5 * v_prev
        x = x + (t[i + 1] - t[i]) * d
        v_prev = v
    return x * (1.0 / tok.cfg.diff_decoder.data_std)


def test_schedule_groups_exact_integer_formula():
    rnd = random.Random()
    for _ in range(200):
        K, S = rnd.randint(1, 40), rnd.randint(1, 80)
        want = [min(math.floor(Fraction(i * K, S) + Fraction(1, 2)), K - 1) for i in range(S)]
        assert step_groups(S, K) == want, (S, K)
    assert step_groups(4, 8) == [0, 2, 4, 6]                       # S < K skips groups
    assert step_groups(8, 4) == [0, 1, 1, 2, 2, 3, 3, 3]           # S > K reads some twice
    assert step_groups(22, 11)[15] == 8                             # exact (the released float64 gives 7)


def test_query_starts_as_released():
    # equal to group * G wherever float64 agrees with exact arithmetic (all K <= 9) ...
    for K in range(1, 10):
        for G in (1, 3, 32):
            for S in range(1, 20):
                assert step_query_starts(S, K, K * G, G) == [g * G for g in step_groups(S, K)]
    # ... and the released code's own reading where it does not: K = 10, G = 9, group 7 starts at 62
    assert step_query_starts(10, 10, 90, 9)[7] == 62


def test_schedule_api():
    tok = tiny_tokenizer()
    times, groups = tok.schedule(6)
    assert len(times) == 7 and times[-1] == 1.0 and times[0] == 0.0 and times == sorted(times)
    assert groups == step_groups(6, tok.num_groups)
    assert tok.schedule() == tok.schedule(tok.cfg.num_denoising_steps)
    assert tok.times(6) == times


@pytest.mark.parametrize("trial", range(3))
def test_decode_matches_plain_loop(trial, one_thread):
    tok = tiny_tokenizer(seed=trial, num_denoising_steps=random.choice([2, 4, 6]))
    B = 2
    codes = torch.randint(0, tok.codebook_size, (B, tok.num_tokens))
    H, W = random.choice([(32, 32), (32, 48), (48, 40)])
    noise = torch.randn(B, 3, H, W)
    for S, solver, clip in [(random.randint(1, 13), "adams2", None), (random.randint(1, 13), "euler", None),
                            (9, "adams2", random.randint(1, 9)), (3, random.choice(["euler", "adams2"]), 2)]:
        out = tok.decode(codes, noise=noise, steps=S, solver=solver, clip_steps=clip)
        assert out.shape == (B, 3, H, W) and out.dtype == torch.float32
        assert rel_err(out, _plain_decode(tok, codes, noise, S, solver, clip)) < 1e-5, (S, solver, clip)


def test_clip_steps_and_groups():
    tok = tiny_tokenizer()
    codes = torch.randint(0, tok.codebook_size, (2, tok.num_tokens))
    noise = torch.randn(2, 3, 32, 32)
    full = tok.decode(codes, noise=noise, steps=6)
    assert torch.equal(tok.decode(codes, noise=noise, steps=6, clip_steps=6), full)
    assert torch.equal(tok.decode(codes, noise=noise, steps=6, clip_steps=60), full)   # c >= S: the full decode
    assert not torch.allclose(tok.decode(codes, noise=noise, steps=6, clip_steps=3), full, atol=1e-3)
    for k in range(1, tok.num_groups + 1):                                            # groups=k is clip_steps=k
        assert torch.equal(tok.decode(codes, noise=noise, groups=k), tok.decode(codes, noise=noise, clip_steps=k))


def test_float32_ode_with_bf16_weights():
    tok32 = tiny_tokenizer()
    tok16 = dar_fast.load_tokenizer(tok32.state_dict(), config=tok32.cfg, dtype=torch.bfloat16)
    codes = torch.randint(0, tok32.codebook_size, (2, tok32.num_tokens))
    noise = torch.randn(2, 3, 32, 32)
    out = tok16.decode(codes, noise=noise, steps=5, solver="euler")
    assert out.dtype == torch.float32
    # the network in bf16, the state and the updates in float32
    assert torch.equal(out, _plain_decode(tok16, codes, noise, 5, "euler", None))


def test_sizes_and_sampling_resolution():
    tok = tiny_tokenizer()                                  # sampling_resolution 32, encoder patch 8, DiT patch 4
    codes = torch.randint(0, tok.codebook_size, (1, tok.num_tokens))
    g = torch.Generator().manual_seed(0)
    assert tok.decode(codes, generator=g).shape == (1, 3, 32, 32)          # default size
    assert tok.decode(codes, generator=g, size=(48, 40)).shape == (1, 3, 48, 40)
    assert tok.decode(codes, generator=g, size=16).shape == (1, 3, 32, 32)  # an asked size is at least 32, as released
    assert tok.decode(codes, noise=torch.randn(1, 3, 36, 44)).shape == (1, 3, 36, 44)   # the noise's size
    assert tok.encode(torch.rand(2, 3, 24, 56) * 2 - 1).shape == (2, tok.num_tokens)     # any size the patch divides
    x = torch.rand(2, 3, 40, 32) * 2 - 1
    rec = tok.reconstruct(x, noise=torch.randn(2, 3, 40, 32))
    assert rec.shape == (2, 3, 40, 32)
    with pytest.raises(UsageError, match="divisible by the encoder patch size"):
        tok.encode(torch.zeros(1, 3, 36, 32))
    with pytest.raises(UsageError, match="divisible by the diffusion patch size"):
        tok.decode(codes, noise=torch.randn(1, 3, 34, 32))


def test_output_resolution():
    tok = tiny_tokenizer()
    tok_r = Tokenizer(dataclasses.replace(tok.cfg, output_resolution=24)).eval()
    tok_r.load_state_dict(tok.state_dict())
    codes = torch.randint(0, tok.codebook_size, (2, tok.num_tokens))
    noise = torch.randn(2, 3, 32, 48)
    plain = tok.decode(codes, noise=noise, steps=3)
    out = tok_r.decode(codes, noise=noise, steps=3)
    assert out.shape == (2, 3, 24, 24)
    assert torch.equal(out, F.interpolate(plain, size=(24, 24), mode="bicubic", align_corners=False))
    tok_big = Tokenizer(dataclasses.replace(tok.cfg, output_resolution=48)).eval()
    tok_big.load_state_dict(tok.state_dict())
    assert torch.equal(tok_big.decode(codes, noise=noise, steps=3), plain)   # no side exceeds 48: unchanged


def test_decode_argument_errors():
    tok = tiny_tokenizer()
    codes = torch.zeros(1, tok.num_tokens, dtype=torch.long)
    for kw, msg in [(dict(steps=0), "steps must be a positive integer"), (dict(steps=2.5), "steps must be"),
                    (dict(solver="heun"), "solver must be 'adams2' or 'euler'"),
                    (dict(steps=6, groups=2), "groups= counts groups and needs steps == num_query_groups"),
                    (dict(groups=2, clip_steps=2), "not both"), (dict(clip_steps=0), "clip_steps must be"),
                    (dict(groups=5), "groups must be in"),
                    (dict(noise=torch.randn(2, 3, 32, 32)), r"noise must be a \(1,3,H,W\)")]:
        with pytest.raises(UsageError, match=msg):
            tok.decode(codes, **kw)


def test_shared_time_encoding_equals_per_block_copies():
    """share_time_encoding: one embedder in the net (released key layout net.time_embed.*); the same as
    every block holding a copy of it."""
    cfg = tiny_tokenizer_config(diff_decoder=dict(share_time_encoding=True))
    shared = randomize_(Tokenizer(cfg)).eval()
    keys = shared.state_dict().keys()
    assert "diff_decoder.net.time_embed.mlp.0.weight" in keys
    assert not any(".blocks.0.time_embed." in k for k in keys)
    per_block = tiny_tokenizer()
    sd = {k: v for k, v in shared.state_dict().items() if not k.startswith("diff_decoder.net.time_embed.")}
    for i in range(cfg.diff_decoder.depth):
        for k, v in shared.net.time_embed.state_dict().items():
            sd[f"diff_decoder.net.blocks.{i}.time_embed.{k}"] = v
    per_block.load_state_dict(sd, strict=True)
    x, t, c = torch.randn(2, 3, 32, 32), torch.rand(2), torch.randn(2, 4, 64)
    with torch.no_grad():
        assert torch.equal(shared.net(x, t, c), per_block.net(x, t, c))


def test_mlp_head():
    """mlp_head (released FinalLayer): LN, time-modulated, then Linear; with a zero modulation it is the conv head
    on LN(LN(x)) ~ LN(x). Without share_time_encoding the released code fails: refused."""
    cfg = tiny_tokenizer_config(diff_decoder=dict(share_time_encoding=True, mlp_head=True))
    head = randomize_(Tokenizer(cfg)).eval()
    keys = head.state_dict().keys()
    assert {"diff_decoder.net.linear_out.linear.weight", "diff_decoder.net.linear_out.adaLN_modulation.1.weight"} <= set(keys)
    assert not any("conv_out" in k for k in keys)
    conv = randomize_(Tokenizer(tiny_tokenizer_config(diff_decoder=dict(share_time_encoding=True)))).eval()
    sd = {k: v for k, v in head.state_dict().items() if "linear_out" not in k}
    sd["diff_decoder.net.conv_out.weight"] = head.net.linear_out.linear.weight[:, :, None, None]
    sd["diff_decoder.net.conv_out.bias"] = head.net.linear_out.linear.bias
    conv.load_state_dict(sd, strict=True)
    x, t, c = torch.randn(2, 3, 32, 32), torch.rand(2), torch.randn(2, 4, 64)
    with torch.no_grad():
        a = head.net(x, t, c)
        assert rel_err(a, conv.net(x, t, c)) > 1e-3                       # the modulation acts
        head.net.linear_out.adaLN_modulation[1].weight.zero_()
        head.net.linear_out.adaLN_modulation[1].bias.zero_()
        assert rel_err(head.net(x, t, c), conv.net(x, t, c)) < 1e-4
    with pytest.raises(UsageError, match="mlp_head=true needs diff_decoder.share_time_encoding"):
        tiny_tokenizer_config(diff_decoder=dict(mlp_head=True)).validate()


def test_vq_disabled_l2_bottleneck():
    """vq_enable false: no codebook; the decoder layers read the l2-normalised latents (released LNBottleneck)."""
    tok = randomize_(Tokenizer(tiny_tokenizer_config(vq_enable=False))).eval()
    assert not any(k.startswith("quantize.") for k in tok.state_dict())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    noise = torch.randn(2, 3, 32, 32)
    with pytest.raises(UsageError, match="vq_enable: false"):
        tok.encode(x)
    with pytest.raises(UsageError, match="vq_enable: false"):
        tok.decode(torch.zeros(2, tok.num_tokens, dtype=torch.long))
    rec = tok.reconstruct(x, noise=noise, steps=3)
    with torch.no_grad():
        z = tok.encode_latents(x)
        cond = tok.cond_from_vectors(z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    # the same decode loop, conditioned on those vectors (monkeypatched cond)
    tok.cond = lambda codes: cond
    want = _plain_decode(tok, None, noise, 3, "adams2", None)
    assert rel_err(rec, want) < 1e-5
    # it loads from a state dict without quantize.* keys
    back = dar_fast.load_tokenizer(tok.state_dict(), config=tok.cfg)
    assert torch.equal(back.reconstruct(x, noise=noise, steps=3), rec)


def test_reconstruct_is_decode_of_encode_with_vq():
    tok = tiny_tokenizer()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    noise = torch.randn(2, 3, 32, 32)
    assert torch.equal(tok.reconstruct(x, noise=noise, steps=5, solver="euler"),
                       tok.decode(tok.encode(x), noise=noise, steps=5, solver="euler"))


def test_low_rank_query_table_is_8_wide():
    tok = Tokenizer(tiny_tokenizer_config(vq_dim=16))
    assert tuple(tok.query_embedding.weight.shape) == (1024, 8) and tuple(tok.query_linear.weight.shape) == (64, 8)
    full = Tokenizer(tiny_tokenizer_config(query_low_rank=False))
    assert tuple(full.query_embedding.weight.shape) == (1024, 64) and full.query_linear is None


def test_steps_may_differ_from_groups_in_config():
    tok = tiny_tokenizer(num_denoising_steps=7)
    assert tok.schedule()[1] == step_groups(7, 4)
    codes = torch.randint(0, tok.codebook_size, (1, tok.num_tokens))
    noise = torch.randn(1, 3, 32, 32)
    assert torch.equal(tok.decode(codes, noise=noise), tok.decode(codes, noise=noise, steps=7))
