"""`dar-fast serve`: D-AR's streaming previews over HTTP with continuous batching across requests.

The HTTP layer needs the `serve` extra (FastAPI + uvicorn); the batcher and the request
checks do not, so `import dar_fast.serve` works without it.

    from dar_fast.serve import create_app          # needs fastapi
    app = create_app(Pipeline.from_pretrained("digits", device="cpu"))
"""
from dar_fast.serve.batcher import Batcher, Job, QueueFull  # noqa: F401

INSTALL_HINT = "install the serve extra: pip install dar-fast[serve]"


def missing_dependency():
    """The name of the first missing serve dependency, or None."""
    import importlib.util
    for mod in ("fastapi", "uvicorn"):
        if importlib.util.find_spec(mod) is None:
            return mod
    return None


def create_app(*args, **kw):
    from dar_fast.serve.app import create_app as _create
    return _create(*args, **kw)
