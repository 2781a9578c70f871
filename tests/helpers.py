"""Small models built in tests (random weights, released key layout)."""
import torch

from dar_fast.config import ARConfig, DiffDecoderConfig, TokenizerConfig
from dar_fast.models import ARModel, Tokenizer


def randomize_(model: torch.nn.Module, scale: float = 0.2, seed: int = 0):
    """The released init zeroes gates and output layers; re-draw every parameter so outputs are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(("norm1.weight", "norm2.weight")) or "_norm.weight" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return model


def tiny_tokenizer_config(**kw) -> TokenizerConfig:
    dd = dict(dim=64, cond_dim=64, patch_size=4, depth=2, repa_layer=99)
    dd.update(kw.pop("diff_decoder", {}))
    base = dict(encoder_patch_size=8, num_encoder_layers=1, num_decoder_layers=1, encoder_dim=64, decoder_dim=64,
                vq_codebook_size=32, num_denoising_steps=4, num_query_groups=4, num_all_queries=16, queries_per_step=4,
                sampling_resolution=32, repa_head=False, diff_decoder=DiffDecoderConfig(**dd))
    base.update(kw)
    return TokenizerConfig(**base)


def tiny_tokenizer(seed=0, **kw) -> Tokenizer:
    return randomize_(Tokenizer(tiny_tokenizer_config(**kw)), seed=seed).eval()


def tiny_ar(seed=0, **kw) -> ARModel:
    base = dict(dim=64, n_layer=2, n_head=2, vocab_size=32, block_size=16, num_classes=5,
                token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    base.update(kw)
    return randomize_(ARModel(ARConfig(**base)), seed=seed).eval()


def random_inception_state_dict(seed: int = 0) -> dict:
    """Random TF-Inception weights in the exact layout of the real file (tests run without the download).

    He-scaled convs and unit-ish BN statistics keep activations O(1) through all 94 layers.
    """
    from dar_fast.eval.inception import InceptionV3FID
    g = torch.Generator().manual_seed(seed)
    out = {}
    with torch.device("meta"):
        layout = InceptionV3FID().state_dict()
    for name, t in layout.items():
        if name.endswith("conv.weight"):
            fan_in = t[0].numel()
            v = torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif name.endswith("running_var"):
            v = 0.5 + torch.rand(t.shape, generator=g)
        elif name.endswith("running_mean") or name.endswith("bn.bias"):
            v = 0.1 * torch.randn(t.shape, generator=g)
        elif name.endswith("bn.weight"):
            v = 0.8 + 0.4 * torch.rand(t.shape, generator=g)
        elif name == "fc.weight":
            v = torch.randn(t.shape, generator=g) * (1.0 / t.shape[1]) ** 0.5
        else:  # fc.bias
            v = 0.1 * torch.randn(t.shape, generator=g)
        out[name] = v.contiguous()
    return out
