"""dar-fast: fast, exact sampling, evaluation and training of D-AR models.

    tok = dar_fast.load_tokenizer(ckpt)          # sequential diffusion tokenizer
    ar = dar_fast.load_ar(ckpt)                  # Llama AR model
    pipe = dar_fast.Pipeline(tokenizer=tok, ar=ar)
"""
__version__ = "0.1.0"

from dar_fast.api import load_ar, load_tokenizer, save_ar, save_tokenizer  # noqa: E402,F401
from dar_fast.config import (AR_PRESETS, TOKENIZER_PRESETS, ARConfig, DiffDecoderConfig,  # noqa: E402,F401
                             TokenizerConfig)


def __getattr__(name):
    # the engine pulls in more (graphs, samplers); import it on first use
    if name in ("Pipeline", "SampleOutput", "StreamStep"):
        from dar_fast import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'dar_fast' has no attribute {name!r}")
