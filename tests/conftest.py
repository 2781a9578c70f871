import os
from pathlib import Path

import pytest
import torch

from dar_fast.kernels.backend import triton_available

ROOT = Path(__file__).resolve().parents[1]
# the released implementation's tensors, copied into the repository so a bare clone tests itself
REFERENCE = Path(os.environ.get("DAR_FAST_REFERENCE", ROOT / "tests" / "data" / "reference"))


def _triton_language_objects():
    """What Triton's interpreter patches (tl, tl.core, tl.math, tl.tensor, tl.dtype, tl.condition, ...)."""
    import triton.language as tl
    return [tl, tl.core, tl.math, tl.tensor, tl.dtype, tl.condition, tl.core.tensor_descriptor_base]


# Triton 3.9's interpreter patches triton.language for a jit *device function* called from an interpreted kernel
# and never restores it (runtime/interpreter.py: the device-call path runs _patch_lang without its scope's
# restore). After such a call a real compile (tests/test_kernels_compile.py) lowers through the interpreter's
# builder and fails, depending on which tests ran before it. The pristine state, taken before any test runs:
_TRITON_PRISTINE = ([(o, dict(vars(o))) for o in _triton_language_objects()] if triton_available() else [])


def restore_triton_language():
    """Undo whatever the interpreter left patched in triton.language (see _TRITON_PRISTINE)."""
    for obj, attrs in _TRITON_PRISTINE:
        for name in [n for n in vars(obj) if n not in attrs]:
            delattr(obj, name)
        for name, value in attrs.items():
            if vars(obj).get(name, _MISSING) is not value:
                try:
                    setattr(obj, name, value)
                except (AttributeError, TypeError):     # read-only slots (__dict__, __weakref__)
                    pass


_MISSING = object()


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
