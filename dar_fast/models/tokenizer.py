"""Sequential diffusion tokenizer: image -> N coarse-to-fine tokens in K groups -> S-step pixel diffusion decode.

Encoder: patches + N learnable queries through gated pre-LN blocks (2D RoPE on
patches, identity on queries; patches see patches, queries see patches and
earlier queries), l2-normalised VQ of the query outputs. Decoder side: code
vectors through causal blocks give `cond`; diffusion step i of S reads group
min(floor(i*K/S + 1/2), K-1) (`schedule`), exactly as the released decoder.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dar_fast import ops
from dar_fast.config import TokenizerConfig
from dar_fast.defaults import SOLVERS
from dar_fast.errors import UsageError
from dar_fast.models.diffusion import DiffusionNet, sampling_times, step_groups, step_query_starts
from dar_fast.models.layers import GatedBlock, layer_norm


class VectorQuantizer(nn.Module):
    """l2-normalised codebook; lookups return normalised rows."""

    def __init__(self, n: int, d: int):
        super().__init__()
        self.embedding = nn.Embedding(n, d)
        # usage statistics of the released training code (fixed 65536 slots); not used at inference
        self.register_buffer("codebook_used", torch.zeros(65536))

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (...) int64 nearest code by cosine."""
        return ops.vq_nearest(z.reshape(-1, z.shape[-1]), self.embedding.weight).view(z.shape[:-1])

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embedding(codes), dim=-1)


class L2Bottleneck(nn.Module):
    """`vq_enable: false`: the released "LNBottleneck", an l2 normalisation of each vq_dim vector
    (no parameters, no codes); the decoder layers read the normalised vectors directly."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(z, dim=-1)


# the released low-rank query table is 8 wide whatever vq_dim is
QUERY_LOW_RANK_DIM = 8


class Tokenizer(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        cfg = cfg.validate()
        self.cfg = cfg
        De, Dd, hd = cfg.encoder_dim, cfg.decoder_dim, cfg.head_dim
        self.patchify = nn.Conv2d(3, De, cfg.encoder_patch_size, stride=cfg.encoder_patch_size)
        if cfg.query_low_rank:
            self.query_embedding = nn.Embedding(cfg.query_table_size, QUERY_LOW_RANK_DIM)
            self.query_linear = nn.Linear(QUERY_LOW_RANK_DIM, De)
        else:
            self.query_embedding = nn.Embedding(cfg.query_table_size, De)
            self.query_linear = None
        self.encoder_layers = nn.ModuleList([GatedBlock(De, hd, cfg.rope_base_len) for _ in range(cfg.num_encoder_layers)])
        self.quant_in_conv = nn.Conv2d(De, cfg.vq_dim, 1, bias=False)
        self.quantize = VectorQuantizer(cfg.vq_codebook_size, cfg.vq_dim) if cfg.vq_enable else L2Bottleneck()
        self.quant_out_conv = nn.Conv2d(cfg.vq_dim, Dd, 1, bias=False)
        self.decoder_embedding = nn.Embedding(cfg.query_table_size, Dd)
        self.decoder_layers = nn.ModuleList([GatedBlock(Dd, hd) for _ in range(cfg.num_decoder_layers)])
        self.diff_decoder = nn.Module()
        self.diff_decoder.net = DiffusionNet(cfg.diff_decoder, hd, repa_head=cfg.repa_head)
        self._mask_cache = {}

    # ------------------------------------------------------------------ properties
    @property
    def num_tokens(self) -> int:
        return self.cfg.num_all_queries

    @property
    def num_groups(self) -> int:
        return self.cfg.num_query_groups

    @property
    def group_size(self) -> int:
        return self.cfg.queries_per_step

    @property
    def image_size(self):
        return self.cfg.image_size

    @property
    def codebook_size(self) -> int:
        return self.cfg.vq_codebook_size

    @property
    def net(self) -> DiffusionNet:
        return self.diff_decoder.net

    @property
    def device(self):
        return self.patchify.weight.device

    @torch.no_grad()
    def initialize_weights(self) -> "Tokenizer":
        """Initialisation for training from scratch, following the released code: truncated-normal(0.02)
        Linear weights with zero biases, zeroed adaLN output layers and velocity output (every DiT block starts
        as the identity and the net predicts v = 0), zero residual gates (already so), low-rank query table
        with std 1, codebook rows uniform(-1/n, 1/n) then l2-normalised. Uses the global torch RNG (seed it
        first); returns self."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        net = self.net
        for blk in net.blocks:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        if net.conv_out is not None:
            nn.init.zeros_(net.conv_out.weight)
            nn.init.zeros_(net.conv_out.bias)
        else:                                    # mlp_head: the released FinalLayer zeroes its Linear and modulation
            for lin in (net.linear_out.linear, net.linear_out.adaLN_modulation[-1]):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
        nn.init.trunc_normal_(self.query_embedding.weight, std=1.0 if self.cfg.query_low_rank else 0.02)
        nn.init.trunc_normal_(self.decoder_embedding.weight, std=0.02)
        if self.cfg.vq_enable:
            n = self.cfg.vq_codebook_size
            w = self.quantize.embedding.weight
            w.uniform_(-1.0 / n, 1.0 / n)
            w.copy_(F.normalize(w, dim=-1))
        return self

    @property
    def dtype(self):
        return self.patchify.weight.dtype

    def times(self, steps: Optional[int] = None) -> list:
        """The S+1 shifted times t_0..t_S (t_S = 1) of an S-step decode (default: the config's steps)."""
        return self.schedule(steps)[0]

    def check_steps(self, steps: Optional[int]) -> int:
        S = self.cfg.num_denoising_steps if steps is None else steps
        if isinstance(S, bool) or not isinstance(S, numbers.Integral) or S < 1:
            raise UsageError(f"steps must be a positive integer (diffusion steps), got {steps!r}")
        return int(S)

    def schedule(self, steps: Optional[int] = None):
        """(times, groups) of an S-step decode: times t_0..t_S (S+1 floats, t_S = 1.0, shifted as
        released); groups[i] = min(floor(i*K/S + 1/2), K-1), the token group step i reads."""
        S = self.check_steps(steps)
        return sampling_times(S, self.cfg.diff_decoder.time_shift), step_groups(S, self.num_groups)

    def query_starts(self, steps: Optional[int] = None) -> list:
        """First condition token step i reads (it reads G tokens from there), as the released code
        computes it: groups[i]*G except for rare float roundings (see `step_query_starts`)."""
        S = self.check_steps(steps)
        return step_query_starts(S, self.num_groups, self.num_tokens, self.group_size)

    # ------------------------------------------------------------------ checks
    def check_images(self, images: torch.Tensor):
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
            raise UsageError(f"images must be a (B,3,H,W) tensor, got {tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
        H, W = images.shape[-2:]
        p = self.cfg.encoder_patch_size
        if H % p or W % p:
            raise UsageError(f"image size {H}x{W} is not divisible by the encoder patch size {p}")
        # any size: the 2D RoPE grid grows with the image, as released

    def check_codes(self, codes: torch.Tensor, full: bool = True):
        self.check_vq("decode")
        if not torch.is_tensor(codes) or codes.dim() != 2 or codes.dtype not in (torch.int64, torch.int32):
            raise UsageError(f"codes must be a (B,N) integer tensor, got "
                             f"{(tuple(codes.shape), codes.dtype) if torch.is_tensor(codes) else type(codes).__name__}")
        if full and codes.shape[1] != self.num_tokens:
            raise UsageError(f"codes have {codes.shape[1]} tokens per image; this tokenizer uses {self.num_tokens}")
        if codes.shape[1] > self.num_tokens:
            raise UsageError(f"codes have {codes.shape[1]} tokens per image; at most {self.num_tokens}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise UsageError(f"codes out of the codebook: values in [{int(codes.min())}, {int(codes.max())}], "
                             f"codebook size {self.codebook_size}")

    # ------------------------------------------------------------------ encoder
    def _encoder_mask(self, P: int, N: int, device) -> torch.Tensor:
        key = (P, N, str(device))
        if key not in self._mask_cache:
            m = torch.zeros(P + N, P + N, dtype=torch.bool, device=device)
            m[:, :P] = True                                                   # everyone sees every patch
            m[P:, P:] = torch.ones(N, N, dtype=torch.bool, device=device).tril()  # queries: causal among queries
            self._mask_cache[key] = m
        return self._mask_cache[key]

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) in [-1,1] -> (B,N,vq_dim) pre-quantisation vectors."""
        self.check_images(images)
        x = self.patchify(images.to(self.dtype))                             # (B,De,h,w)
        B, D, h, w = x.shape
        x = layer_norm(x.flatten(2).transpose(1, 2))                          # (B,P,De)
        N = self.num_tokens
        q = self.query_embedding.weight[:N]
        if self.query_linear is not None:
            q = self.query_linear(q)
        x = torch.cat([x, q[None].expand(B, N, D)], dim=1)                    # (B,P+N,De)
        pos = ops.grid_positions(h, w, num_identity=N, device=x.device)
        mask = self._encoder_mask(h * w, N, x.device)
        for blk in self.encoder_layers:
            x = blk(x, pos=pos, mask=mask)
        z = layer_norm(x[:, h * w:])                                          # (B,N,De)
        return F.linear(z, self.quant_in_conv.weight.flatten(1))              # 1x1 conv == linear, (B,N,vq_dim)

    def check_vq(self, what: str):
        if not self.cfg.vq_enable:
            raise UsageError(f"{what}: this tokenizer has vq_enable: false (continuous l2-normalised latents, the "
                             "released LNBottleneck): it has no discrete codes; use reconstruct(images)")

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) float in [-1,1], H and W divisible by the encoder patch -> (B,N) int64 codes."""
        self.check_vq("encode")
        return self.quantize.codes(self.encode_latents(images))

    @torch.no_grad()
    def latent_vectors(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) -> (B,N,vq_dim) the vectors the decoder layers read: normalised codebook rows
        (VQ) or the l2-normalised latents (vq_enable: false)."""
        z = self.encode_latents(images)
        if self.cfg.vq_enable:
            return self.quantize.lookup(self.quantize.codes(z)).to(self.dtype)
        return self.quantize(z)

    # ------------------------------------------------------------------ decoder side
    def code_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        self.check_vq("decoding codes")
        return self.quantize.lookup(codes).to(self.dtype)

    def cond_from_vectors(self, zq: torch.Tensor) -> torch.Tensor:
        """(B,T,vq_dim) normalised code vectors of the first T tokens -> (B,T,Dd) condition tokens."""
        T = zq.shape[1]
        x = F.linear(zq, self.quant_out_conv.weight.flatten(1)) + self.decoder_embedding.weight[:T]
        for blk in self.decoder_layers:
            x = blk(x, is_causal=True)
        return layer_norm(x)

    def new_cond_cache(self, batch: int, device=None, dtype=None):
        """Static K/V buffers (one pair per decoder layer) for `cond_incremental`."""
        H, hd = self.cfg.decoder_dim // self.cfg.head_dim, self.cfg.head_dim
        shape = (batch, H, self.num_tokens, hd)
        kw = dict(device=device or self.device, dtype=dtype or self.dtype)
        return [(torch.zeros(shape, **kw), torch.zeros(shape, **kw)) for _ in self.decoder_layers]

    def cond_incremental(self, codes: torch.Tensor, start: int, cache) -> torch.Tensor:
        """Condition tokens for codes at slots [start, start+T), reusing the K/V of earlier slots.

        Equals cond(all codes)[:, start:start+T] up to float rounding; each group costs only its own
        tokens (the streaming engine calls it once per group)."""
        T = codes.shape[1]
        zq = self.code_vectors(codes.long())
        x = F.linear(zq, self.quant_out_conv.weight.flatten(1)) + self.decoder_embedding.weight[start:start + T]
        for blk, kv in zip(self.decoder_layers, cache):
            x = blk(x, cache=kv, start=start)
        return layer_norm(x)

    def cond(self, codes: torch.Tensor) -> torch.Tensor:
        """(B,T) codes (T <= N) -> (B,T,Dd) condition tokens (causal: a prefix gives the same prefix)."""
        self.check_codes(codes, full=False)
        return self.cond_from_vectors(self.code_vectors(codes.long()))

    def velocity(self, x: torch.Tensor, t, cond_group: torch.Tensor) -> torch.Tensor:
        """v(x_t, t, group): the network in the weights' dtype; the result in x's dtype (float32 ODEs)."""
        B = x.shape[0]
        if not torch.is_tensor(t):
            t = torch.full((B,), float(t), device=x.device, dtype=torch.float32)
        return self.net(x.to(self.dtype), t, cond_group.to(self.dtype)).to(x.dtype)

    def group(self, cond: torch.Tensor, i: int) -> torch.Tensor:
        G = self.group_size
        return cond[:, i * G:(i + 1) * G]

    def decode_size(self, size=None):
        """(H, W) of a decode: `sampling_resolution` by default; an asked size is raised to at
        least `sampling_resolution` per side, as the released `decode_code` does."""
        H0, W0 = self.image_size
        if size is None:
            return H0, W0
        H, W = (size, size) if isinstance(size, int) else tuple(size)
        H, W = max(H0, int(H)), max(W0, int(W))
        p = self.cfg.diff_decoder.patch_size
        if H % p or W % p:
            raise UsageError(f"decode size {H}x{W} is not divisible by the diffusion patch size {p}")
        return H, W

    def initial_noise(self, batch: int, generator: Optional[torch.Generator] = None, size=None) -> torch.Tensor:
        H, W = self.decode_size(size)
        return torch.randn(batch, 3, H, W, generator=generator).to(self.device, torch.float32)

    def output_size(self, size=None):
        """(H, W) of the images a decode at `size` returns, after `output_resolution`."""
        H, W = self.decode_size(size)
        R = self.cfg.output_resolution
        return (R, R) if R and (H > R or W > R) else (H, W)

    def resize_output(self, images: torch.Tensor) -> torch.Tensor:
        """The released `output_resolution` R: if either side exceeds R, a bicubic resize
        (align_corners False, no antialias) to R x R; otherwise the images unchanged."""
        R = self.cfg.output_resolution
        if R and (images.shape[-2] > R or images.shape[-1] > R):
            return F.interpolate(images, size=(R, R), mode="bicubic", align_corners=False)
        return images

    def check_noise(self, noise: torch.Tensor, batch: int):
        p = self.cfg.diff_decoder.patch_size
        if not torch.is_tensor(noise) or noise.dim() != 4 or noise.shape[0] != batch or noise.shape[1] != 3 \
                or noise.shape[2] % p or noise.shape[3] % p:
            got = tuple(noise.shape) if torch.is_tensor(noise) else type(noise).__name__
            raise UsageError(f"noise must be a ({batch},3,H,W) tensor with H and W divisible by the diffusion "
                             f"patch size {p}, got {got}")

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, noise: Optional[torch.Tensor] = None, steps: Optional[int] = None,
               solver: str = "adams2", clip_steps: Optional[int] = None, groups: Optional[int] = None,
               generator: Optional[torch.Generator] = None, size=None) -> torch.Tensor:
        """(B,N) codes -> (B,3,H,W) float32 image (x / data_std, not clamped), as the released `decode_code`.

        steps: diffusion steps S (default: the config's num_denoising_steps); step i runs at
            t = s(i/S) and reads group min(floor(i*K/S + 1/2), K-1).
        solver: "adams2" (Euler first, then x += dt*(1.5 v - 0.5 v_prev)) or "euler".
        clip_steps=c: the released preview, the first c steps with the last going straight to t = 1
            (c >= S: the full decode). groups=k (only when S == K) is the same as clip_steps=k.
        noise: (B,3,H,W) initial noise; the decode runs at its size. Without it, noise is drawn
            (from `generator`) at `size` (default sampling_resolution; an asked size is at least that).
        The ODE is integrated in float32 whatever the weights' dtype (the network runs in the weights'
        dtype). Afterwards `output_resolution` applies (`resize_output`).
        """
        self.check_codes(codes, full=True)
        S, clip_steps = self._check_decode_args(steps, solver, clip_steps, groups)
        return self._integrate(self.cond(codes), codes.shape[0], noise, generator, size, S, solver, clip_steps)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, noise: Optional[torch.Tensor] = None, steps: Optional[int] = None,
                    solver: str = "adams2", clip_steps: Optional[int] = None,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Encode then decode (the released `straight_forward`), also for `vq_enable: false` tokenizers.

        Decodes at the image's size raised to at least sampling_resolution (or at the noise's size);
        options as in `decode`."""
        S, clip_steps = self._check_decode_args(steps, solver, clip_steps, None)
        cond = self.cond_from_vectors(self.latent_vectors(images))
        return self._integrate(cond, images.shape[0], noise, generator, tuple(images.shape[-2:]), S, solver, clip_steps)

    def _check_decode_args(self, steps, solver, clip_steps, groups):
        S, K = self.check_steps(steps), self.num_groups
        if solver not in SOLVERS:
            raise UsageError(f"solver must be 'adams2' or 'euler', got {solver!r}")
        if groups is not None:
            if clip_steps is not None:
                raise UsageError("give clip_steps or groups, not both")
            if S != K:
                raise UsageError(f"groups= counts groups and needs steps == num_query_groups ({K}); with "
                                 f"steps={S} use clip_steps (it counts steps)")
            if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or not 1 <= groups <= K:
                raise UsageError(f"groups must be in [1, {K}], got {groups!r}")
            clip_steps = groups
        if clip_steps is not None:
            if isinstance(clip_steps, bool) or not isinstance(clip_steps, numbers.Integral) or clip_steps < 1:
                raise UsageError(f"clip_steps must be a positive integer, got {clip_steps!r}")
            clip_steps = int(clip_steps)
        return S, clip_steps

    def _integrate(self, cond, B, noise, generator, size, S, solver, clip_steps):
        """The released sampler: S steps (or the first clip_steps, the last to t = 1) in float32."""
        if noise is None:
            noise = self.initial_noise(B, generator, size)
        else:
            self.check_noise(noise, B)
        n = S if clip_steps is None else min(S, clip_steps)
        ts, _ = self.schedule(S)
        starts = self.query_starts(S)
        G = self.group_size
        x, v_prev = noise.to(self.device, torch.float32), None
        for i in range(n):
            v = self.velocity(x, ts[i], cond[:, starts[i]:starts[i] + G])
            t_next = ts[i + 1] if i < n - 1 else 1.0          # the last step of a preview goes to t = 1
            x = ops.flow_step(x, v, v_prev if solver == "adams2" else None, ts[i], t_next)
            v_prev = v
        # released: x * (1 / data_std), a multiplication by the rounded reciprocal
        return self.resize_output(x * (1.0 / self.cfg.diff_decoder.data_std))

    def num_params(self, include_repa: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not include_repa and self.net.repa_out is not None:
            n -= sum(p.numel() for p in self.net.repa_out.parameters())
        return n
