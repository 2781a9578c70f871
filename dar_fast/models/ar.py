"""Class-conditional Llama decoder (LlamaGen layout) with a preallocated KV cache.

Sequence: [class token; image tokens]. Position j of the output predicts image
token j. The KV cache is a pair of static buffers written by index (addresses
never move, so one captured CUDA graph replays every decode step).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dar_fast import ops
from dar_fast.attention import attend
from dar_fast.config import ARConfig
from dar_fast.kernels.rms_norm import rms_norm_ref
from dar_fast.kernels.swiglu import swiglu_ref
from dar_fast.models.layers import FusedWeights


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The released RMSNorm: normalise in float32, cast back to x's dtype, multiply by the weight.

    float32 x and weight: `F.rms_norm`, one call instead of eight (pow, mean, add, rsqrt, mul, cast, mul)
    with the same result bit for bit on the CPU (tests/test_decode_block.py checks odd sizes); other dtypes
    keep the formula, whose rounding to x's dtype before the weight multiply `F.rms_norm` does not make."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32 and not torch.is_grad_enabled():
        return F.rms_norm(x, weight.shape, weight, eps)
    return rms_norm_ref(x, weight, eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class KVCache(nn.Module):
    def __init__(self, batch, heads, length, head_dim, dtype, device):
        super().__init__()
        shape = (batch, heads, length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # pos (T,) int64 slots; k, v (B,Hk,T,hd)
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, v)
        return self.k_cache, self.v_cache


class Attention(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.rope_base = float(cfg.rope_base)   # released ModelArgs.rope_base (LlamaGen default 10000)
        self.attn_dropout_p = cfg.attn_dropout_p
        self.resid_dropout = nn.Dropout(cfg.resid_dropout_p)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x, rope_pos, input_pos=None, mask=None):
        # x (B,T,D); rope_pos (T,1) rotary positions; input_pos (T,) cache slots (None: no cache, causal)
        B, T, D = x.shape
        Hq, Hk, hd = self.n_head, self.n_kv, self.hd
        qkv = self.wqkv(x)
        q = qkv[..., :Hq * hd].view(B, T, Hq, hd)
        k = qkv[..., Hq * hd:(Hq + Hk) * hd].view(B, T, Hk, hd)
        v = qkv[..., (Hq + Hk) * hd:].view(B, T, Hk, hd)
        q, k = ops.apply_rope(q, k, rope_pos, self.rope_base)
        if input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k.transpose(1, 2), v.transpose(1, 2))   # (B,Hk,L,hd)
            k, v = k.transpose(1, 2), v.transpose(1, 2)                                  # (B,L,Hk,hd)
        if Hk != Hq:
            k = k.repeat_interleave(Hq // Hk, dim=2)
            v = v.repeat_interleave(Hq // Hk, dim=2)
        dp = self.attn_dropout_p if self.training else 0.0
        o = attend(q, k, v, mask=mask, is_causal=mask is None, dropout_p=dp)             # (B,T,Hq,hd)
        return self.resid_dropout(self.wo(o.reshape(B, T, D)))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). In inference w1 (gate) and w3 (up) run as one GEMM over a merged
    (2H, D) copy (`layers.FusedWeights`, rebuilt when the parameters change), then `ops.swiglu` on the two
    halves; training, state dicts and checkpoints see the released w1 / w3 parameters."""

    def __init__(self, cfg: ARConfig):
        super().__init__()
        h = cfg.ffn_hidden
        self.w1 = nn.Linear(cfg.dim, h, bias=False)
        self.w3 = nn.Linear(cfg.dim, h, bias=False)
        self.w2 = nn.Linear(h, cfg.dim, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout_p)
        self._fused = FusedWeights(self.w1, self.w3)

    def forward(self, x):
        if torch.is_grad_enabled() and (self.w1.weight.requires_grad or self.w3.weight.requires_grad):
            return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))
        x13 = F.linear(x, self._fused.get()[0])
        # under torch.compile the reference (the compiler fuses it); eager: the Triton kernel on CUDA
        y = swiglu_ref(x13) if torch.compiler.is_compiling() else ops.swiglu(x13)
        return self.ffn_dropout(self.w2(y))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth (training only): drop the whole residual branch of a sample with probability p,
    scaling kept ones by 1/(1-p), as timm's DropPath the released model uses."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ARConfig, drop_path_p: float = 0.0):
        super().__init__()
        self.drop_path_p = float(drop_path_p)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, rope_pos, input_pos=None, mask=None):
        if self.drop_path_p > 0.0 and self.training:
            x = x + drop_path(self.attention(self.attention_norm(x), rope_pos, input_pos, mask), self.drop_path_p, True)
            return x + drop_path(self.feed_forward(self.ffn_norm(x)), self.drop_path_p, True)
        x = x + self.attention(self.attention_norm(x), rope_pos, input_pos, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class LabelEmbedder(nn.Module):
    """Class table with num_classes + 1 rows; the last row is the null class for CFG."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels):
        return self.embedding_table(labels)


class ARModel(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        cfg = cfg.validate()
        self.cfg = cfg
        self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        # released: drop-path rate rising linearly from 0 to drop_path_rate over the layers (training only)
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.n_layer, device="cpu").tolist()   # cpu: also under meta
        self.layers = nn.ModuleList([TransformerBlock(cfg, dpr[i]) for i in range(cfg.n_layer)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.cache_batch = 0
        self.cache_len = 0

    # ------------------------------------------------------------------ properties
    @property
    def num_tokens(self) -> int:
        return self.cfg.block_size

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def device(self):
        return self.output.weight.device

    @property
    def dtype(self):
        return self.output.weight.dtype

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def initialize_weights(self) -> "ARModel":
        """Initialisation for training from scratch (LlamaGen's): Linear and Embedding weights
        normal(0, initializer_range), zero biases, the output projection zeroed (the model starts at the uniform
        distribution). Uses the global torch RNG (seed it first); returns self."""
        std = self.cfg.initializer_range
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
        nn.init.zeros_(self.output.weight)
        return self

    # ------------------------------------------------------------------ checks
    def check_labels(self, labels: torch.Tensor, allow_null: bool = True):
        hi = self.num_classes if allow_null else self.num_classes - 1
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > hi):
            bad = labels[(labels < 0) | (labels > hi)].tolist()
            raise ValueError(f"class labels out of range: {bad[:8]}; valid ids are 0..{self.num_classes - 1}"
                             + (f" (and {self.num_classes} for the null class)" if allow_null else ""))

    def check_tokens(self, tokens: torch.Tensor):
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (B,T), got shape {tuple(tokens.shape)}")
        if tokens.shape[1] >= self.num_tokens:
            raise ValueError(f"tokens have T={tokens.shape[1]}; the model predicts T+1 positions, so T must be < N={self.num_tokens}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(f"tokens out of the vocabulary: values in [{int(tokens.min())}, {int(tokens.max())}], vocab {self.vocab_size}")

    # ------------------------------------------------------------------ forward
    @staticmethod
    def rope_positions(seq_idx: torch.Tensor) -> torch.Tensor:
        """Sequence index (0 = class token) -> (T,1) rotary position: the class token and image token 0..N-1
        sit at positions 0, 1, ..., N (the released layout)."""
        return seq_idx.to(torch.int32)[:, None]

    def embed(self, tokens: Optional[torch.Tensor], labels: Optional[torch.Tensor]) -> torch.Tensor:
        parts = []
        if labels is not None:
            parts.append(self.cls_embedding(labels)[:, None])
        if tokens is not None and tokens.shape[1]:
            parts.append(self.tok_embeddings(tokens))
        return self.tok_dropout(torch.cat(parts, dim=1))

    def head(self, h):
        return self.output(self.norm(h)).float()

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, check: bool = True) -> torch.Tensor:
        """Teacher forcing: tokens (B,T) T < N, labels (B,) -> logits (B,T+1,V) float32.

        ``check``: validate the inputs (host syncs). Training passes False: its codes are checked once when
        the code set is opened, and a step stays free of device-to-host copies."""
        if check:
            self.check_tokens(tokens)
            self.check_labels(labels)
        h = self.embed(tokens, labels)
        rope_pos = self.rope_positions(torch.arange(h.shape[1], device=h.device))
        for layer in self.layers:
            h = layer(h, rope_pos)
        return self.head(h)

    # ------------------------------------------------------------------ KV cache
    def setup_cache(self, batch: int, length: Optional[int] = None, dtype=None, device=None):
        """Allocate static KV buffers for `batch` rows and `length` sequence slots (default N + 1)."""
        length = length or (self.num_tokens + 1)
        dtype, device = dtype or self.dtype, device or self.device
        if (self.cache_batch, self.cache_len) == (batch, length) and self.layers[0].attention.kv_cache is not None \
                and self.layers[0].attention.kv_cache.k_cache.dtype == dtype:
            return
        for layer in self.layers:
            a = layer.attention
            a.kv_cache = KVCache(batch, a.n_kv, length, a.hd, dtype, device)
        self.cache_batch, self.cache_len = batch, length
        self.register_buffer("causal_mask", torch.ones(length, length, dtype=torch.bool, device=device).tril(), persistent=False)

    def install_cache(self, caches, batch: int):
        """Use the given KVCache modules (one per layer, from an earlier setup_cache): the engine owns
        its buffers, so captured graphs keep their addresses whatever else ran on the model."""
        length = caches[0].k_cache.shape[2]
        for layer, c in zip(self.layers, caches):
            layer.attention.kv_cache = c
        if self.cache_len != length or getattr(self, "causal_mask", None) is None:
            dev = caches[0].k_cache.device
            self.register_buffer("causal_mask", torch.ones(length, length, dtype=torch.bool, device=dev).tril(),
                                 persistent=False)
        self.cache_batch, self.cache_len = batch, length

    def forward_cached(self, x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """x (B,T,D) embeddings at sequence slots input_pos (T,) -> logits (B,T,V); writes the cache."""
        if self.cache_batch != x.shape[0]:
            raise RuntimeError(f"KV cache set up for batch {self.cache_batch}, got {x.shape[0]}: call setup_cache")
        mask = self.causal_mask[input_pos][None, None]                       # (1,1,T,L) keys <= query slot
        rope_pos = self.rope_positions(input_pos)
        for layer in self.layers:
            x = layer(x, rope_pos, input_pos, mask)
        return self.head(x)

    def prefill(self, labels: torch.Tensor, prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Class token (+ optional prefix tokens) into the cache -> logits (B,V) for the next image token."""
        x = self.embed(prefix, labels)
        pos = torch.arange(x.shape[1], device=x.device)
        return self.forward_cached(x, pos)[:, -1]

    def decode_one(self, token: torch.Tensor, slot) -> torch.Tensor:
        """token (B,) at sequence slot `slot` (int or (1,) tensor) -> logits (B,V)."""
        if not torch.is_tensor(slot):
            slot = torch.tensor([slot], device=token.device)
        return self.forward_cached(self.tok_embeddings(token)[:, None], slot.view(1))[:, 0]
