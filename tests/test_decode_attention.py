"""decode_attention: Triton kernel (CPU: TRITON_INTERPRET=1) and the torch path against SDPA over the used prefix."""
import pytest
import torch
import torch.nn.functional as F

from dar_fast import ops
from dar_fast.kernels import decode_attention as dm
from dar_fast.kernels.decode_attention import choose_splits, decode_attention, decode_attention_ref

from conftest import needs_triton, rel_err


def setup(B, Hq, Hk, S, D, dtype=torch.float32):
    q = torch.randn(B, Hq, D, dtype=dtype)
    k = torch.randn(B, Hk, S, D, dtype=dtype)
    v = torch.randn(B, Hk, S, D, dtype=dtype)
    return q, k, v


def exact(q, k, v, lens):
    """float64 attention of each row over its prefix: the answer rounding errors are measured against."""
    return decode_attention_ref(q.double(), k.double(), v.double(), lens)


CASES = [  # B, Hq, Hk, S_max, D, lengths (per row, or one int for every row)
    (3, 4, 4, 257, 64, [1, 17, 257]),
    (2, 6, 2, 130, 64, [129, 64]),          # GQA G = 3; a length on a tile boundary
    (1, 5, 1, 33, 48, 20),                  # MQA, D not a power of two, one scalar length
    (2, 3, 3, 300, 32, [0, 299]),           # an empty row -> zeros
]


@pytest.mark.parametrize("B,Hq,Hk,S,D,lens", CASES)
@pytest.mark.parametrize("splits", [None, 3])
def test_fp32_matches_sdpa_prefix(backend, B, Hq, Hk, S, D, lens, splits):
    q, k, v = setup(B, Hq, Hk, S, D)
    cl = torch.tensor(lens, dtype=torch.int32)
    out = ops.decode_attention(q, k, v, cl, num_splits=splits)
    ref = decode_attention_ref(q, k, v, cl)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref) < 2e-5
    if isinstance(lens, list) and 0 in lens:
        assert torch.equal(out[lens.index(0)], torch.zeros_like(out[0]))


def test_reads_only_the_prefix(backend):
    """Garbage (NaN) past each row's length changes nothing: those positions are never used (the kernel
    never loads them)."""
    q, k, v = setup(2, 4, 2, 200, 64)
    cl = torch.tensor([37, 150])
    ref = decode_attention_ref(q, k, v, cl)
    for b, n in enumerate(cl.tolist()):
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
    out = decode_attention(q, k, v, cl, num_splits=4)
    assert not out.isnan().any() and rel_err(out, ref) < 2e-5


def test_strided_query_and_length_clamp(backend):
    """q as a view into a fused (B, 1, 3*H*D) projection; a length above S_max reads S_max positions."""
    B, H, D, S = 2, 4, 64, 45
    qkv = torch.randn(B, 1, 3 * H * D)
    q = qkv[:, 0, :H * D].view(B, H, D)
    _, k, v = setup(B, H, H, S, D)
    cl = torch.tensor(1000)
    out = decode_attention(q, k, v, cl)
    full = F.scaled_dot_product_attention(q[:, :, None], k, v)[:, :, 0]
    assert rel_err(out, full) < 2e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_within_torch_error(backend, dtype):
    """Error vs float64 at most 2x SDPA's own in this dtype. The kernel rounds p to the cache dtype before
    p v (as FlashAttention does); the interpreter rounds fp32 -> bf16 by truncation, so there every p is
    biased low by up to 1 bf16 ulp: measured 3.0x torch's error on average, 4.8x worst over 15 seeds; 8x."""
    q, k, v = setup(2, 4, 2, 257, 64, dtype)
    cl = torch.tensor([257, 100])
    out = decode_attention(q, k, v, cl)
    ref = decode_attention_ref(q, k, v, cl)
    ex = exact(q, k, v, cl)
    err, err_t = (out.double() - ex).abs().max().item(), (ref.double() - ex).abs().max().item()
    factor = 8 if (backend == "triton" and dtype == torch.bfloat16) else 2
    assert out.dtype == dtype and err <= factor * err_t + 1e-6, (err, err_t)


def test_choose_splits():
    assert choose_splits(1, 16, 257) == 5             # batch 1: 16 programs -> split the prefix over 5 tiles
    assert choose_splits(128, 16, 257) == 1           # large batch: one split, no combine
    assert choose_splits(2, 16, 257) == 5 and choose_splits(8, 16, 257) == 3
    assert choose_splits(1, 1, 10) == 1


def test_bad_input(backend):
    q, k, v = setup(2, 4, 2, 16, 8)
    with pytest.raises(ValueError, match="q must be"):
        decode_attention(q[0], k, v, 3)
    with pytest.raises(ValueError, match="not a multiple"):
        decode_attention(torch.randn(2, 5, 8), k, v, 3)
    with pytest.raises(ValueError, match="must both be"):
        decode_attention(q, k, v[:, :, :8], 3)
    with pytest.raises(ValueError, match="cache_len must be"):
        decode_attention(q, k, v, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="cache_len must be"):
        decode_attention(q, k, v, torch.tensor(2.0))
    with pytest.raises(ValueError, match="dtypes differ"):
        decode_attention(q, k.double(), v, 3)


@needs_triton
def test_dispatch(monkeypatch):
    calls = []
    real = dm.decode_attention_triton
    monkeypatch.setattr(dm, "decode_attention_triton", lambda *a: calls.append(1) or real(*a))
    q, k, v = setup(1, 2, 2, 20, 16)
    monkeypatch.setenv("DAR_FAST_BACKEND", "torch")
    decode_attention(q, k, v, 5)
    assert not calls
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("DAR_FAST_BACKEND_DECODE_ATTENTION", "triton")
    decode_attention(q, k, v, 5)
    assert calls == [1]


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("B,Hq,Hk,dtype", [(2, 16, 16, torch.bfloat16), (128, 16, 16, torch.bfloat16),
                                           (5, 12, 4, torch.float32)])
def test_gpu_matches_ref(monkeypatch, B, Hq, Hk, dtype):
    monkeypatch.delenv("DAR_FAST_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(B, Hq, 64, device="cuda", dtype=dtype)
    k = torch.randn(B, Hk, 257, 64, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    cl = torch.randint(1, 258, (B,), device="cuda")
    out, ref = decode_attention(q, k, v, cl), decode_attention_ref(q, k, v, cl)
    assert rel_err(out, ref) < (2e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.gpu
def test_gpu_cuda_graph_with_device_length(monkeypatch):
    """One captured graph serves every step: the length lives on the device and is only rewritten."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(2, 16, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 16, 257, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cl = torch.ones((), dtype=torch.int32, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        decode_attention(q, k, v, cl)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = decode_attention(q, k, v, cl)
    for n in (1, 17, 200, 257):
        cl.fill_(n)
        g.replay()
        assert rel_err(out, decode_attention_ref(q, k, v, cl)) < 2e-2
