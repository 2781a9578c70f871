"""The embedded default model: a small D-AR trained by our own pipeline on scikit-learn's digits.

Reproduce the weights with the commands in the README ("The embedded digits model").
"""
import os

HERE = os.path.dirname(os.path.abspath(__file__))
DIGITS_TOKENIZER = os.path.join(HERE, "digits_tokenizer.safetensors")
DIGITS_AR = os.path.join(HERE, "digits_ar.safetensors")
# sampling defaults the shipped model was validated with (tests/test_digits_model.py)
DIGITS_DEFAULTS = {"cfg": 3.0}       # also in digits_ar.json ("sampling"), which Pipeline reads


def digits_paths():
    missing = [p for p in (DIGITS_TOKENIZER, DIGITS_AR) if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"embedded digits model not found ({', '.join(missing)}); this install lacks the "
                                "package data: reinstall dar-fast, or train it with the README's commands")
    return DIGITS_TOKENIZER, DIGITS_AR
