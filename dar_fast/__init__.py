"""dar-fast: fast, exact sampling, evaluation and training of D-AR models."""
__version__ = "0.1.0"
