"""D-AR models in plain PyTorch: the sequential diffusion tokenizer and the Llama AR model."""
from dar_fast.models.ar import ARModel  # noqa: F401
from dar_fast.models.tokenizer import Tokenizer  # noqa: F401
