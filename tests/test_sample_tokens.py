"""sample_tokens: Philox known answers, bit-exact building blocks, C++ (and CUDA) == the PyTorch
reference token for token, batch invariance, determinism, the drawn distribution (chi-square),
bad input, and on a GPU graph capture.

Every implementation computes the same bits (kernels/sample_tokens.py explains how), so the
comparisons below are exact: no tolerance, no near-tie allowance.
"""
import math
import os
import warnings

import pytest
import torch

from dar_fast.kernels import sample_tokens as st
from dar_fast.kernels.sample_tokens import sample_tokens, sample_tokens_ref

EXT = st.extension_status()
needs_ext = pytest.mark.skipif(not EXT["built"], reason=f"dar_fast._C did not build or load ({EXT['error']}); "
                                                        "rebuild with `pip install --no-build-isolation -e .`")
needs_cuda_ext = pytest.mark.skipif(not EXT["cuda"], reason="dar_fast._C was built without CUDA")
I64 = torch.int64

# Random123 tests/kat_vectors, philox4x32 10: counter (4 words), key (2 words) -> output (4 words)
KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.fixture
def auto_backend(monkeypatch):
    """No backend forced through the environment: the compiled op runs where it is built."""
    monkeypatch.delenv("DAR_FAST_BACKEND", raising=False)
    monkeypatch.delenv("DAR_FAST_BACKEND_SAMPLE_TOKENS", raising=False)


def rand_i64(n, device="cpu"):
    """Seeds / sample ids over the whole int64 range (negative ones included)."""
    return torch.randint(-2 ** 63, 2 ** 63 - 1, (n,), dtype=I64, device=device)


def make_case(B, V, dtype, *, uncond=True, spread=3.0, ties=False, masked=False, device="cpu"):
    c = torch.randn(B, V) * spread
    u = torch.randn(B, V) * spread if uncond else None
    if ties:   # coarse values: many exact ties, at the top-k / top-p boundaries too
        c = torch.round(c)
        u = None if u is None else torch.round(u)
    if masked:  # a banned part of the vocabulary
        c[:, torch.rand(V) < 0.3] = -math.inf
    c = c.to(dtype=dtype, device=device)
    u = None if u is None else u.to(dtype=dtype, device=device)
    keys = dict(seeds=rand_i64(B, device), sample_ids=rand_i64(B, device))
    return c, u, keys


# ----------------------------------------------------------------------------- building blocks


def test_philox_known_answers():
    ctr, key, want = (torch.tensor([k[i] for k in KAT], dtype=I64) for i in range(3))
    assert torch.equal(st.philox4x32_10(ctr, key), want)


@needs_ext
def test_philox_known_answers_cpp():
    ctr, key, want = (torch.tensor([k[i] for k in KAT], dtype=I64) for i in range(3))
    assert torch.equal(torch.ops.dar_fast._philox4x32_10(ctr, key), want)


def test_philox_words_layout():
    """Entry i of a row is word i % 4 of the block with counter (i // 4, position, sid_lo, sid_hi)."""
    seeds, sids = rand_i64(3), rand_i64(3)
    pos = torch.tensor([0, 5, 2 ** 32 - 1])
    words = st.philox_words(seeds, sids, pos, 0, 10)
    for b in range(3):
        s, i = seeds[b].item() & (2 ** 64 - 1), sids[b].item() & (2 ** 64 - 1)
        for e in (0, 3, 4, 9):
            ctr = torch.tensor([[e // 4, pos[b].item(), i & 0xFFFFFFFF, i >> 32]])
            key = torch.tensor([[s & 0xFFFFFFFF, s >> 32]])
            assert words[b, e] == st.philox4x32_10(ctr, key)[0, e % 4]
    assert torch.equal(st.philox_words(seeds, sids, pos, 8, 10), words[:, 8:10])


def ulp(x: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(x.abs(), torch.tensor(math.inf, dtype=x.dtype)) - x.abs()


def test_log_and_exp_accuracy():
    """The hand-written float64 log / exp agree with the library functions to 2 ulp (both are
    faithfully rounded; in practice they differ by at most 1 ulp, in 2% / 10% of the cases)."""
    x = torch.cat([torch.rand(200000, dtype=torch.float64) * 30 + 1e-300,
                   torch.exp(-50 * torch.rand(200000, dtype=torch.float64)),
                   1 - torch.rand(100000, dtype=torch.float64) * 1e-6])
    ref = torch.log(x)
    assert ((st._log_f64(x) - ref).abs() <= 2 * ulp(ref)).all()
    d = -22 * torch.rand(500000, dtype=torch.float64)
    y, k = st._exp_f64_scaled(d)
    e, ref = y * torch.pow(2.0, k.double()), torch.exp(d)
    assert ((e - ref).abs() <= 2 * ulp(ref)).all()


def test_gumbel_and_mass_edges():
    g = st.gumbel_noise(torch.tensor([0, 2 ** 32 - 1]))
    assert -3.2 < g[0] < -3.0 and 22.8 < g[1] < 22.9                    # the noise range the race relies on
    q = st.exp_mass(torch.tensor([0.0, -0.0, -22.0, -22.5, -math.inf, math.nan], dtype=torch.float64))
    assert q.tolist() == [2 ** 31, 2 ** 31, 0, 0, 0, 0]


@needs_ext
def test_building_blocks_bitwise_cpp():
    w = torch.randint(0, 2 ** 32, (300000,), dtype=I64)
    w[:4] = torch.tensor([0, 1, 2 ** 31, 2 ** 32 - 1])
    assert torch.equal(torch.ops.dar_fast._gumbel_noise(w), st.gumbel_noise(w))
    d = torch.cat([-23 * torch.rand(300000, dtype=torch.float64),
                   torch.tensor([0.0, -0.0, -1e-300, -22.0, -math.inf, math.nan], dtype=torch.float64)])
    assert torch.equal(torch.ops.dar_fast._exp_mass(d), st.exp_mass(d))


def radix_search(ok) -> int:
    """The CUDA kernel's threshold search (sample_filtered_kernel), transcribed: the largest 32-bit t
    with ok(t), for ok monotone (true at 0, false from some t on), deciding 2 bits per pass."""
    t = 0
    for shift in range(30, -1, -2):
        sel = 0
        for d in (1, 2, 3):
            if ok(t + (d << shift)):
                sel = d
        t += sel << shift
    return t


@pytest.mark.parametrize("levels", [3, 50, 2 ** 31])
def test_threshold_search_equals_sorted_definition(levels):
    """The kernel's searches give exactly the sort-based thresholds, ties included:
    top-k's k-th largest key and top-p's cut q_(n) (the first sorted mass whose prefix reaches p)."""
    for _ in range(20):
        V = int(torch.randint(1, 3000, ()))
        keys = torch.randint(0, levels, (V,), dtype=I64) * ((2 ** 32 - 1) // max(levels - 1, 1))
        k = int(torch.randint(1, V + 1, ()))
        assert radix_search(lambda t: int((keys >= t).sum()) >= k) == keys.sort(descending=True).values[k - 1]
        q = torch.randint(0, min(levels, 2 ** 31), (V,), dtype=I64)
        q[0] = 2 ** 31                                           # the top token's mass
        p = float(torch.rand(()).clamp_min(1e-9))
        need = float(q.sum()) * p
        qs = q.sort(descending=True).values
        want = qs[int((qs.cumsum(0).double() < need).sum())]
        assert radix_search(lambda t: float(q[q >= t].sum()) >= need) == want


# ----------------------------------------------------------------------------- compiled op == reference

VARIANTS = {
    "plain": dict(uncond=False),
    "cfg": dict(cfg_scale=3.5),
    "cfg_rows": dict(cfg_scale="rows", temperature=0.8),
    "temperature": dict(uncond=False, temperature=1.7),
    "top_k": dict(cfg_scale=2.0, top_k=13),
    "top_p": dict(cfg_scale=1.5, top_p=0.8),
    "top_k_top_p": dict(cfg_scale=4.0, temperature=0.6, top_k=40, top_p=0.9),
    "ties": dict(cfg_scale=2.0, top_k=7, top_p=0.5, ties=True),
    "peaky_masked": dict(cfg_scale=8.0, spread=10.0, masked=True, top_p=0.95),
    "tiny_top_p": dict(uncond=False, top_p=1e-6, temperature=2.0),
}


def call_args(variant, B, V, dtype, device="cpu"):
    kw = dict(VARIANTS[variant])
    case = {k: kw.pop(k) for k in ("uncond", "spread", "ties", "masked") if k in kw}
    c, u, keys = make_case(B, V, dtype, device=device, **case)
    if kw.get("cfg_scale") == "rows":
        kw["cfg_scale"] = (torch.rand(B) * 6).to(device)
    return (c, u), dict(kw, **keys)


@needs_ext
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [1000, 16384, 61])
def test_cpp_matches_reference(auto_backend, variant, dtype, V):
    B = 7
    (c, u), kw = call_args(variant, B, V, dtype)
    assert st._use_ext(c.device)
    for positions in (int(torch.randint(0, 256, ())), torch.randint(0, 2 ** 40, (B,))):
        got = sample_tokens(c, u, positions=positions, **kw)
        want = sample_tokens_ref(c, u, positions=positions, **kw)
        assert got.dtype == I64 and got.shape == (B,)
        assert torch.equal(got, want), f"{variant}: {got.tolist()} != {want.tolist()}"


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, "mixed", torch.float8_e4m3fn])
def test_cpp_other_dtypes(auto_backend, dtype):
    B, V = 5, 333
    c, u = torch.randn(B, V, dtype=torch.float64) * 4, torch.randn(B, V) * 4
    if dtype == "mixed":        # uncond in another dtype: each side is rounded to float32 first
        c = c.to(torch.bfloat16)
    else:
        c, u = c.to(dtype), u.to(dtype)
    kw = dict(cfg_scale=2.5, top_k=50, seeds=rand_i64(B), sample_ids=rand_i64(B), positions=3)
    assert torch.equal(sample_tokens(c, u, **kw), sample_tokens_ref(c.float(), u.float(), **kw))


@needs_ext
def test_cpp_strided_inputs(auto_backend):
    B, V = 6, 500
    big = torch.randn(B, 2 * V + 7)
    c, u = big[:, 3:3 + V], big[:, ::2][:, :V]          # row stride > V; column stride 2
    kw = dict(cfg_scale=torch.rand(2 * B)[::2] * 3, top_p=0.7, seeds=rand_i64(2 * B)[::2],
              sample_ids=rand_i64(B), positions=torch.arange(B) * 3)
    assert torch.equal(sample_tokens(c, u, **kw), sample_tokens_ref(c.contiguous(), u.contiguous(), **kw))


@needs_ext
def test_cpp_batch_of_one_vocab_and_degenerate_rows(auto_backend):
    keys = dict(seeds=rand_i64(3), sample_ids=rand_i64(3), positions=0)
    assert sample_tokens(torch.randn(3, 1), **keys).tolist() == [0, 0, 0]
    rows = torch.randn(3, 40)
    rows[1] = -math.inf                                   # nothing allowed: token 0, like argmax
    for kw in (dict(), dict(top_k=3), dict(top_p=0.5)):
        got = sample_tokens(rows, **kw, **keys)
        assert torch.equal(got, sample_tokens_ref(rows, **kw, **keys)) and got[1] == 0
    empty = sample_tokens(torch.randn(0, 10), seeds=rand_i64(0), sample_ids=rand_i64(0), positions=0)
    assert empty.shape == (0,) and empty.dtype == I64


# ----------------------------------------------------------------------------- keyed draws


def backends():
    return ["torch", pytest.param("auto", marks=needs_ext)]


@pytest.mark.parametrize("backend", backends())
def test_batch_invariance(monkeypatch, backend):
    """A row alone, or inside a shuffled bigger batch, gives the same token."""
    monkeypatch.setenv("DAR_FAST_BACKEND_SAMPLE_TOKENS", backend)
    B, V = 11, 1000
    c, u, keys = make_case(B, V, torch.bfloat16)
    scale, pos = torch.rand(B) * 5, torch.randint(0, 256, (B,))
    kw = dict(temperature=0.9, top_k=100, top_p=0.95)
    full = sample_tokens(c, u, scale, seeds=keys["seeds"], sample_ids=keys["sample_ids"], positions=pos, **kw)
    perm = torch.randperm(B)
    shuffled = sample_tokens(c[perm], u[perm], scale[perm], seeds=keys["seeds"][perm],
                             sample_ids=keys["sample_ids"][perm], positions=pos[perm], **kw)
    assert torch.equal(shuffled, full[perm])
    for b in (0, 5, B - 1):
        alone = sample_tokens(c[b:b + 1], u[b:b + 1], float(scale[b]), seeds=keys["seeds"][b:b + 1],
                              sample_ids=keys["sample_ids"][b:b + 1], positions=int(pos[b]), **kw)
        assert alone.item() == full[b].item()


@pytest.mark.parametrize("backend", backends())
def test_determinism_and_key_sensitivity(monkeypatch, backend):
    monkeypatch.setenv("DAR_FAST_BACKEND_SAMPLE_TOKENS", backend)
    B, V = 64, 1000
    c, u, keys = make_case(B, V, torch.float32, spread=0.5)
    kw = dict(cfg_scale=1.5, positions=9, **keys)
    first = sample_tokens(c, u, **kw)
    assert torch.equal(sample_tokens(c, u, **kw), first)
    for name, new in (("seeds", keys["seeds"] + 1), ("sample_ids", keys["sample_ids"] ^ (1 << 40)),
                      ("positions", 10)):
        other = sample_tokens(c, u, **dict(kw, **{name: new}))
        assert (other != first).sum() > B // 2, f"changing {name} barely changed the draws"
    # positions are taken modulo 2^32, as an int or as a tensor
    same = sample_tokens(c, u, **dict(kw, positions=torch.full((B,), 9 + 2 ** 32)))
    assert torch.equal(same, first)


# ----------------------------------------------------------------------------- the drawn distribution


def chi2_pvalue(counts, probs):
    from scipy.stats import chisquare
    n = counts.sum().item()
    return chisquare(counts.double().numpy(), (probs * n).numpy()).pvalue


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("filt", ["none", "top_k", "top_p"])
@pytest.mark.parametrize("vary", ["sample_ids", "positions"])
def test_distribution_chi_square(monkeypatch, backend, filt, vary):
    """20000 keyed draws over V = 12 follow softmax((u + s (c - u)) / T), renormalised over the tokens
    top-k / top-p keep, with no draw outside them. Fixed logits and keys: the outcome is fixed."""
    monkeypatch.setenv("DAR_FAST_BACKEND_SAMPLE_TOKENS", backend)
    N, V, s, T = 20000, 12, 2.5, 1.3
    g = torch.Generator().manual_seed(20240611)
    c, u = torch.randn(V, generator=g), torch.randn(V, generator=g)
    l = ((u + (c - u) * s) / T).double()
    p = torch.softmax(l, 0)
    keep = torch.ones(V, dtype=torch.bool)
    kw = {}
    if filt == "top_k":
        kw["top_k"] = 5
        keep = l >= l.topk(5).values[-1]
    elif filt == "top_p":
        kw["top_p"] = 0.8
        ps, order = p.sort(descending=True)
        m = int((ps.cumsum(0) < 0.8).sum())
        assert abs(ps.cumsum(0)[m] - 0.8) > 1e-6 and abs(ps.cumsum(0)[m - 1] - 0.8) > 1e-6
        keep = torch.zeros(V, dtype=torch.bool)
        keep[order[:m + 1]] = True
    probs = torch.where(keep, p, 0)
    probs = probs / probs.sum()
    keys = dict(seeds=torch.full((N,), 123456789), sample_ids=torch.full((N,), 42), positions=7)
    keys[vary] = torch.arange(N)
    tokens = sample_tokens(c.expand(N, V), u.expand(N, V), cfg_scale=s, temperature=T, **kw, **keys)
    counts = torch.bincount(tokens, minlength=V)
    assert counts[~keep].sum() == 0, f"draws outside the kept set: {counts.tolist()}"
    pval = chi2_pvalue(counts[keep], probs[keep])
    assert pval > 1e-3, f"chi-square p = {pval:.2e}: counts {counts.tolist()} vs expected {(probs * N).tolist()}"


# ----------------------------------------------------------------------------- bad input


def good_args(B=4, V=10):
    return dict(logits=torch.randn(B, V), uncond_logits=torch.randn(B, V), seeds=torch.arange(B),
                sample_ids=torch.arange(B), positions=0)


@pytest.mark.parametrize("fn", [sample_tokens, sample_tokens_ref])
@pytest.mark.parametrize("change,match", [
    (dict(temperature=0.0), "temperature"), (dict(temperature=-1.0), "temperature"),
    (dict(temperature=math.nan), "temperature"), (dict(temperature=math.inf), "temperature"),
    (dict(temperature=1e-50), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=-0.1), "top_p"),
    (dict(top_p=math.nan), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(logits=torch.randn(10)), "logits"), (dict(logits=torch.randn(4, 0)), "logits"),
    (dict(logits=torch.randint(0, 5, (4, 10))), "logits"),
    (dict(uncond_logits=torch.randn(4, 11)), "uncond_logits"),
    (dict(uncond_logits=torch.randn(3, 10)), "uncond_logits"),
    (dict(seeds=torch.arange(3)), "seeds"), (dict(seeds=torch.rand(4)), "seeds"),
    (dict(sample_ids=torch.arange(5)), "sample_ids"),
    (dict(positions=torch.arange(3)), "positions"), (dict(positions=1.5), "positions"),
    (dict(cfg_scale=torch.ones(3)), "cfg_scale"), (dict(cfg_scale="2"), "cfg_scale"),
])
def test_bad_input_errors(fn, change, match):
    args = dict(good_args(), **change)
    with pytest.raises((ValueError, TypeError), match=match):
        fn(args.pop("logits"), args.pop("uncond_logits"), **args)


@needs_ext
def test_op_checks_its_inputs():
    """The compiled op checks on its own (it can be called without the Python wrapper)."""
    B, V = 3, 8
    x = torch.randn(B, V)
    ok = [x, None, None, 1.0, 1.0, 0, 1.0, torch.arange(B), torch.arange(B), None, 0]
    op = torch.ops.dar_fast.sample_tokens
    assert op(*ok).shape == (B,)
    for i, bad in ((4, 0.0), (6, 2.0), (5, -1), (1, torch.randn(B, V + 1)), (7, torch.arange(B + 1)),
                   (9, torch.arange(B, dtype=torch.int32))):
        args = list(ok)
        args[i] = bad
        with pytest.raises((ValueError, TypeError, RuntimeError), match="sample_tokens"):
            op(*args)


# ----------------------------------------------------------------------------- dispatch, build, tracing


def test_ops_reexport():
    from dar_fast import ops
    assert ops.sample_tokens is sample_tokens


def test_extension_built_when_required():
    if os.environ.get("DAR_FAST_REQUIRE_EXT", "0") != "1":
        pytest.skip("set DAR_FAST_REQUIRE_EXT=1 to require the compiled sampler (CI does)")
    assert EXT["built"], f"dar_fast._C did not build or load: {EXT['error']}"


@pytest.mark.gpu
def test_extension_built_with_cuda_on_a_gpu():
    # `pytest -m gpu` must not go green when the CUDA sampler failed to build: every needs_cuda_ext test
    # below would skip, and the engine would silently sample with the PyTorch reference
    assert EXT["built"] and EXT["cuda"], f"dar_fast._C is not built with CUDA on a CUDA machine: {EXT}"


@pytest.mark.parametrize("var", ["DAR_FAST_BACKEND_SAMPLE_TOKENS", "DAR_FAST_BACKEND"])
def test_backend_switch_forces_reference(monkeypatch, var):
    monkeypatch.delenv("DAR_FAST_BACKEND_SAMPLE_TOKENS", raising=False)
    monkeypatch.setenv(var, "torch")
    assert not st._use_ext(torch.device("cpu"))
    calls = []
    monkeypatch.setattr(st, "_sample_ref", lambda a: calls.append(a) or torch.zeros(a.logits.shape[0], dtype=I64))
    sample_tokens(**{k: v for k, v in good_args().items() if k != "uncond_logits"})
    assert len(calls) == 1


def test_missing_extension_warns_once(monkeypatch, auto_backend):
    monkeypatch.setattr(st, "_load_ext", lambda: None)
    monkeypatch.setattr(st, "_WARNED", set())
    args = good_args()
    with pytest.warns(RuntimeWarning, match="reference"):
        first = sample_tokens(args.pop("logits"), args.pop("uncond_logits"), **args)
    args = good_args()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample_tokens(args.pop("logits"), args.pop("uncond_logits"), **args)
    assert first.shape == (4,)


@needs_ext
def test_opcheck_fake_impl():
    """Schema, fake (meta) implementation and tracing of the op, as torch.compile and CUDA graphs need."""
    B, V = 4, 50
    args = (torch.randn(B, V), torch.randn(B, V), torch.rand(B), 1.0, 0.9, 5, 0.8, rand_i64(B), rand_i64(B),
            torch.arange(B, dtype=I64), 0)
    torch.library.opcheck(torch.ops.dar_fast.sample_tokens.default, args)


@needs_ext
def test_torch_compile_traces_the_op(auto_backend):
    B, V = 4, 50

    def f(c, u, s, seeds, sids, pos):
        return sample_tokens(c, u, cfg_scale=s, temperature=0.8, top_k=7, seeds=seeds, sample_ids=sids, positions=pos)

    args = (torch.randn(B, V), torch.randn(B, V), torch.rand(B), rand_i64(B), rand_i64(B), torch.arange(B))
    assert torch.equal(torch.compile(f, backend="aot_eager")(*args), f(*args))


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_reference_on_cuda_matches_cpu(monkeypatch):
    monkeypatch.setenv("DAR_FAST_BACKEND_SAMPLE_TOKENS", "torch")
    for variant in ("cfg_rows", "top_k_top_p", "ties"):
        (c, u), kw = call_args(variant, 7, 1000, torch.bfloat16)
        want = sample_tokens_ref(c, u, positions=11, **kw)
        kw_cuda = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        got = sample_tokens_ref(c.cuda(), u.cuda(), positions=11, **kw_cuda)
        assert torch.equal(got.cpu(), want), variant


@pytest.mark.gpu
@needs_cuda_ext
def test_building_blocks_bitwise_cuda():
    ctr, key, want = (torch.tensor([k[i] for k in KAT], dtype=I64) for i in range(3))
    assert torch.equal(torch.ops.dar_fast._philox4x32_10(ctr.cuda(), key.cuda()).cpu(), want)
    w = torch.randint(0, 2 ** 32, (300000,), dtype=I64)
    assert torch.equal(torch.ops.dar_fast._gumbel_noise(w.cuda()).cpu(), st.gumbel_noise(w))
    d = torch.cat([-23 * torch.rand(300000, dtype=torch.float64), torch.tensor([0.0, -math.inf, math.nan],
                                                                               dtype=torch.float64)])
    assert torch.equal(torch.ops.dar_fast._exp_mass(d.cuda()).cpu(), st.exp_mass(d))


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [1000, 16384, 61, 65536])
def test_cuda_matches_cpu_reference(auto_backend, variant, dtype, V):
    B = 7
    (c, u), kw = call_args(variant, B, V, dtype)
    for positions in (int(torch.randint(0, 256, ())), torch.randint(0, 2 ** 40, (B,))):
        want = sample_tokens_ref(c, u, positions=positions, **kw)
        args = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in dict(kw, positions=positions).items()}
        got = sample_tokens(c.cuda(), None if u is None else u.cuda(), **args)
        assert got.is_cuda and torch.equal(got.cpu(), want), f"{variant}: {got.tolist()} != {want.tolist()}"


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("filtered", [False, True])
def test_cuda_graph_capture_and_replay(auto_backend, filtered):
    """One captured launch serves every step: logits, positions and CFG scales change in place."""
    B, V = 16, 16384
    dev = torch.device("cuda")
    c = torch.zeros(B, V, dtype=torch.bfloat16, device=dev)
    u = torch.zeros_like(c)
    scale = torch.ones(B, device=dev)
    pos = torch.zeros(B, dtype=I64, device=dev)
    seeds, sids = rand_i64(B, dev), rand_i64(B, dev)
    kw = dict(temperature=0.9, top_k=64, top_p=0.9) if filtered else dict(temperature=1.0)

    def step():
        return sample_tokens(c, u, scale, seeds=seeds, sample_ids=sids, positions=pos, **kw)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()                                             # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for j in range(3):
        c.copy_(torch.randn(B, V) * 3)
        u.copy_(torch.randn(B, V) * 3)
        scale.copy_(torch.rand(B) * 5)
        pos.fill_(j * 7)
        graph.replay()
        torch.cuda.synchronize()
        want = sample_tokens_ref(c.cpu(), u.cpu(), scale.cpu(), seeds=seeds.cpu(), sample_ids=sids.cpu(),
                                 positions=j * 7, **kw)
        assert torch.equal(out.cpu(), want), f"replay {j}"
