"""Backend selection for every op in `dar_fast.ops`.

`DAR_FAST_BACKEND=torch|triton|auto` forces all ops; `DAR_FAST_BACKEND_<OP>`
(e.g. `DAR_FAST_BACKEND_VQ_NEAREST=torch`) forces one op and wins over the
global switch. `auto` picks the GPU kernel for CUDA tensors and the CPU
implementation (reference or C++) otherwise. `triton` on CPU tensors is only
meaningful under `TRITON_INTERPRET=1` (how the tests exercise the kernels).
"""
from __future__ import annotations

import os

_VALID = ("auto", "torch", "triton")


def requested(op: str) -> str:
    """The backend asked for `op` by the environment: 'auto', 'torch' or 'triton'."""
    val = os.environ.get(f"DAR_FAST_BACKEND_{op.upper()}") or os.environ.get("DAR_FAST_BACKEND") or "auto"
    val = val.strip().lower()
    if val not in _VALID:
        raise ValueError(f"DAR_FAST_BACKEND{'_' + op.upper() if os.environ.get(f'DAR_FAST_BACKEND_{op.upper()}') else ''}={val!r}: expected one of {_VALID}")
    return val


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def use_triton(op: str, *tensors) -> bool:
    """True when `op` should run its Triton kernel on these tensors."""
    want = requested(op)
    if want == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if want == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: DAR_FAST_BACKEND asks for triton but triton is not installed (pip install triton)")
        if not on_cuda and not interp:
            raise RuntimeError(f"{op}: triton backend on CPU tensors needs TRITON_INTERPRET=1")
        return True
    return on_cuda and triton_available()
