"""What the kernel modules need to know about Triton itself: whether it imports here.

Which implementation of an op runs (the DAR_FAST_BACKEND switches, the op table) is decided in one place,
`dar_fast.ops`; the kernels ask it through `dar_fast.ops.use_kernel`.
"""
from __future__ import annotations

import functools


@functools.lru_cache(None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True
