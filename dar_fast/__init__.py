"""dar-fast: fast, exact sampling, evaluation and training of D-AR models.

    tok = dar_fast.load_tokenizer(ckpt)          # sequential diffusion tokenizer
    ar = dar_fast.load_ar(ckpt)                  # Llama AR model
    pipe = dar_fast.Pipeline(tokenizer=tok, ar=ar)
"""
__version__ = "0.1.0"

# The public names are imported on first use (PEP 562), so `import dar_fast.cli` is instant: the command line
# imports torch inside its own error handling, and a Ctrl-C during that import still ends quietly.
_LAZY = {
    "load_ar": "dar_fast.api", "load_tokenizer": "dar_fast.api", "save_ar": "dar_fast.api",
    "save_tokenizer": "dar_fast.api",
    "AR_PRESETS": "dar_fast.config", "TOKENIZER_PRESETS": "dar_fast.config", "ARConfig": "dar_fast.config",
    "DiffDecoderConfig": "dar_fast.config", "TokenizerConfig": "dar_fast.config",
    "Pipeline": "dar_fast.pipeline", "SampleOutput": "dar_fast.pipeline", "StreamStep": "dar_fast.pipeline",
    "UsageError": "dar_fast.errors",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
    import importlib
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value           # later lookups skip this function
        return value
    if not name.startswith("__"):         # a submodule (dar_fast.ops, dar_fast.assets, ...), as an eager import gave
        try:
            return importlib.import_module(f"dar_fast.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"dar_fast.{name}":
                raise
    raise AttributeError(f"module 'dar_fast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
