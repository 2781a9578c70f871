"""Launches and graph captures run on their tensors' own GPU: a pipeline on cuda:1 works while cuda:0 is current.

Triton launches, torch.cuda.Stream and CUDAGraph all use the *current* device; the kernels' launchers
(kernels/_interp.on_device) and the engine's captures (engine_graphs._on_own_device) make the tensors' device
current first. The multi-GPU checks need two GPUs and are skipped otherwise.
"""
import contextlib

import pytest
import torch

from dar_fast.kernels._interp import on_device

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


def test_on_device_is_a_no_op_for_cpu_tensors():
    assert isinstance(on_device(torch.zeros(1)), contextlib.nullcontext)
    assert isinstance(on_device(None), contextlib.nullcontext)


def test_engine_guard_finds_the_step_device():
    from dar_fast.engine_graphs import _on_own_device

    class Step:
        def __init__(self):
            self.mode, self.pos = "captured", torch.zeros(1)
    assert isinstance(_on_own_device(Step()), contextlib.nullcontext)


@pytest.mark.gpu
def test_on_device_makes_the_tensor_device_current():
    last = torch.cuda.device_count() - 1
    with on_device(torch.zeros(1, device=f"cuda:{last}")):
        assert torch.cuda.current_device() == last
    assert torch.cuda.current_device() == 0


@pytest.mark.gpu
@two_gpus
def test_kernels_on_the_second_gpu_match_their_references():
    from dar_fast import ops
    from dar_fast.kernels.flow_step import flow_step_ref
    from dar_fast.kernels.rope import apply_rope_ref
    from dar_fast.kernels.vq_nearest import vq_nearest_ref
    dev = torch.device("cuda:1")
    assert torch.cuda.current_device() == 0
    z, cb = torch.randn(333, 8, device=dev), torch.randn(1001, 8, device=dev)
    assert torch.equal(ops.vq_nearest(z, cb), vq_nearest_ref(z, cb))
    q, k = torch.randn(3, 7, 4, 32, device=dev), torch.randn(3, 7, 2, 32, device=dev)
    pos = torch.randint(0, 50, (7, 2), device=dev)
    for got, want in zip(ops.apply_rope(q, k, pos), apply_rope_ref(q, k, pos)):
        assert (got - want).abs().max() < 1e-5
    x, v, vp = (torch.randn(2, 3, 17, 19, device=dev) for _ in range(3))
    assert (ops.flow_step(x, v, vp, 0.2, 0.35) - flow_step_ref(x, v, vp, 0.2, 0.35)).abs().max() < 1e-5


@pytest.mark.gpu
@two_gpus
def test_captured_pipeline_on_the_second_gpu_equals_the_first():
    from dar_fast.pipeline import Pipeline
    from helpers import tiny_ar, tiny_tokenizer
    tok = tiny_tokenizer(seed=1)
    outs = []
    for dev in ("cuda:0", "cuda:1"):
        t, a = tiny_tokenizer(seed=1).to(dev), tiny_ar(seed=2, vocab_size=tok.codebook_size,
                                                        block_size=tok.num_tokens).to(dev)
        outs.append(Pipeline(t, a, use_cuda_graphs=True).sample([0, 1, 2], cfg=4.0, seed=5))
    assert torch.cuda.current_device() == 0
    assert torch.equal(outs[0].tokens, outs[1].tokens)
    assert (outs[0].images.int() - outs[1].images.int()).abs().max() <= 1
