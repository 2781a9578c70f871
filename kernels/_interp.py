"""Running the Triton kernels under TRITON_INTERPRET=1 when triton was imported without it.

`triton.jit` reads TRITON_INTERPRET when it decorates. The kernels here are
decorated lazily, per mode (see each kernel file's `_kernel(s)`), but
triton.language's own @jit helpers (tl.sum, tl.max, tl.min, tl.cdiv, ...)
were decorated when triton was imported: if that happened before the variable
was set (a test that sets it, after another module imported triton), they are
compiled-mode functions that the interpreter refuses to call (so are a kernel
file's own @triton.jit device functions). `interpreted_stdlib` swaps in
interpreted twins of them for the duration of one launch and puts the
originals back; it does nothing when they are already interpreted, and is only
entered in interpreter mode, so compiled launches never see it.
"""
from __future__ import annotations

import contextlib
import functools
import os


def interpreting() -> bool:
    """Whether triton kernels run in the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _twins(extra_modules: tuple = ()):
    """[(module, name, compiled JITFunction, interpreted twin)] for triton.language's helpers and `extra_modules`'."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    out = []
    by_fn: dict = {}       # one twin per function, shared by every module that exposes it (identity checks)
    for mod in (tl, tl.standard, tl.math, tl.core, *extra_modules):
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, JITFunction):
                out.append((mod, name, obj, by_fn.setdefault(id(obj), InterpretedFunction(obj.fn))))
    return out


@contextlib.contextmanager
def interpreted_stdlib(*extra_modules):
    """Within: triton.language's @jit helpers (and those of `extra_modules`, e.g. a kernel file's own
    @triton.jit device functions) are interpreter-callable. A no-op outside interpreter mode."""
    if not interpreting():
        yield
        return
    twins = _twins(tuple(extra_modules))
    for mod, name, _, twin in twins:
        setattr(mod, name, twin)
    try:
        yield
    finally:
        for mod, name, orig, _ in twins:
            setattr(mod, name, orig)


def on_device(t):
    """`t`'s CUDA device as the current one for a launch (a no-op for CPU tensors): Triton launches on the
    current device, so a tensor on cuda:1 under current device 0 would be read through the wrong GPU."""
    if getattr(t, "is_cuda", False):
        import torch
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
