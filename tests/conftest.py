import os
from pathlib import Path

import pytest
import torch

from dar_fast.kernels.backend import triton_available

ROOT = Path(__file__).resolve().parents[1]
# the released implementation's tensors, copied into the repository so a bare clone tests itself
REFERENCE = Path(os.environ.get("DAR_FAST_REFERENCE", ROOT / "tests" / "data" / "reference"))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not (REFERENCE / "tokenizer_tiny.io.safetensors").exists():
        pytest.fail(f"reference tensors not found at {REFERENCE} (set DAR_FAST_REFERENCE)")
    return REFERENCE


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a-b| / max|b|, the project's parity metric."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # fresh random inputs every run; a failing test's report shows the seed ("torch seed" section), and
    # DAR_FAST_TEST_SEED=N replays it
    seed = int(os.environ.get("DAR_FAST_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(seed)
    request.node.add_report_section("call", "torch seed", f"DAR_FAST_TEST_SEED={seed}")
    yield seed


needs_triton = pytest.mark.skipif(not triton_available(), reason="triton not installed")


@pytest.fixture(params=["torch", pytest.param("triton", marks=needs_triton)])
def backend(request, monkeypatch):
    """Force one backend through the environment switch (triton: the interpreter on CPU)."""
    monkeypatch.setenv("DAR_FAST_BACKEND", request.param)
    if request.param == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return request.param


@pytest.fixture
def one_thread():
    # tiny models: one thread is as fast, and far faster than two threads fighting other jobs for 2 cores
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for it in items:
        if "gpu" in it.keywords:
            it.add_marker(skip)
