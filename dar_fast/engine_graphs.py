"""The engine's two step functions over static buffers: one AR decode step, one tokenizer step.

`DecodeStep.step` is one pure function of buffers the object owns:
    sample token j from the logits (CFG scale j, keyed by (seed, id, j))
    -> tokens[:, j] = t -> embed -> L layers (K/V written at slot j+1, attention over the
    used prefix) -> logits for token j+1 -> pos += 1
and `TokenizerStep` has two: `cond_step` (the causal decoder layers on one new group, K/V
cached) and `diffusion_step` (DiT velocity, flow step, optional uint8 preview). Each runs
  * eager       the function as written (CPU default: compiling costs tens of seconds);
  * compiled    torch.compile(fullgraph=True) of the same function; on CPU with dynamic shapes,
                so the prefix length is a symbolic int and one graph serves every position;
  * captured    (CUDA) a CUDA graph around the compiled function with static shapes: the prefix
                length then lives on the device (`decode_attention` reads `pos`), so one graph
                replays every decode position.
Why our own capture and not compile's mode="reduce-overhead": the step mutates buffers the
object owns (KV cache, tokens, pos); cudagraph trees copy graph inputs into their own static
pool and skip graphs that mutate inputs ("skipping cudagraphs due to mutated inputs"), so they
would either not capture or add a copy of every buffer per replay. Capturing the compiled
function ourselves keeps one set of buffers and replays with zero copies.
`static=True` runs the capture variant (device-side length, no host ints) eagerly: that is
how the CPU tests check the logic the CUDA graph replays.
"""
from __future__ import annotations

import contextlib
import math
import os
import struct
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from dar_fast import ops
from dar_fast.kernels import sample_tokens as _st
from dar_fast.kernels.swiglu import swiglu_ref
from dar_fast.models.ar import rms_norm
from dar_fast.models.layers import layer_norm, rope_table


def _f32(x: float) -> float:
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:
        return math.inf


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     backend: Optional[str] = None):
    """One query per row over the first lengths[0] cache slots, the length on the device (capture-safe).

    q (R,H,1,hd), caches (R,Hk,L,hd), lengths (1,) int64 -> (R,H,1,hd). CUDA: flash_attn_with_kvcache
    (fp16/bf16, on-device cache_seqlens) when flash-attn is installed, else the Triton decode kernel
    (`kernels/decode_attention.py`, only the used prefix is read); both read no mask. Elsewhere (and
    for CUDA without Triton) the exact fallback: SDPA over all L slots with the unused ones masked by a
    comparison against the device length (reads every slot, no host sync)."""
    backend = backend or attention_backend(q)      # the step objects resolve it once, outside compiled code
    if backend == "flash":
        from flash_attn import flash_attn_with_kvcache
        seqlens = lengths.to(torch.int32).expand(q.shape[0]).contiguous()
        o = flash_attn_with_kvcache(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                                    cache_seqlens=seqlens)                              # (R,1,H,hd)
        return o.transpose(1, 2)
    if backend == "triton":
        return _decode_attention_op(q[:, :, 0], k_cache, v_cache, lengths.reshape(()))[:, :, None]
    L = k_cache.shape[2]
    keep = torch.arange(L, device=q.device)[None, :] < lengths[:, None]        # (1, L)
    return F.scaled_dot_product_attention(q, _rep(k_cache, q), _rep(v_cache, q), attn_mask=keep[None, None])


def attention_backend(q: torch.Tensor) -> str:
    """flash | triton | sdpa-masked: what `decode_attention` runs for tensors like q (the benchmark records it)."""
    if not q.is_cuda:
        return "sdpa-masked"
    from dar_fast.attention import _flash, backend
    if backend() in ("auto", "flash") and _flash() is not None and q.dtype in (torch.float16, torch.bfloat16):
        try:
            from flash_attn import flash_attn_with_kvcache  # noqa: F401
            return "flash"
        except Exception:
            pass
    from dar_fast.kernels.backend import triton_available
    return "triton" if triton_available() else "sdpa-masked"


@torch.library.custom_op("dar_fast::engine_decode_attention", mutates_args=())
def _decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         cache_len: torch.Tensor) -> torch.Tensor:
    """The Triton decode kernel as an opaque op: torch.compile keeps the launch in its graph instead of
    tracing the Python launcher, and a CUDA graph captures it like any kernel."""
    from dar_fast.kernels.decode_attention import decode_attention as kern
    return kern(q, k_cache, v_cache, cache_len)


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, cache_len):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _rep(kv: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    Hq, Hk = q.shape[1], kv.shape[1]
    return kv if Hq == Hk else kv.repeat_interleave(Hq // Hk, dim=1)


def _on_own_device(obj):
    """The step's own CUDA device as the current one: torch.cuda.Stream, CUDAGraph and Triton launches use the
    current device, so a pipeline on cuda:1 under current device 0 would capture on the wrong GPU."""
    dev = next((t.device for t in vars(obj).values() if torch.is_tensor(t)), None)
    return torch.cuda.device(dev) if dev is not None and dev.type == "cuda" else contextlib.nullcontext()


class _Runner:
    """Mode handling shared by the step objects: eager, compiled, captured (see the module docstring)."""

    def __init__(self, mode: str):
        if mode not in ("eager", "compiled", "captured"):
            raise ValueError(f"engine mode must be eager|compiled|captured, got {mode!r}")
        self.mode = mode
        self.fallback: Optional[str] = None      # why a faster mode was dropped (reported by the benchmark)
        self._compiled = {}
        self._graphs = {}
        self._pool = None

    def _compile(self, name, fn, dynamic):
        f = self._compiled.get(name)
        if f is None:
            import torch._dynamo as dynamo
            # every DecodeStep / TokenizerStep (one per batch size and sampling settings) shares the step's code
            # object, and dynamo counts each as a recompile of it: the default limit (8) would drop a long-lived
            # process (FID over several batch sizes, a server) to eager after 8 configurations
            dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 256)
            dynamo.config.accumulated_recompile_limit = max(dynamo.config.accumulated_recompile_limit, 4096)
            backend = os.environ.get("DAR_FAST_COMPILE_BACKEND", "inductor")   # "eager": trace only (tests)
            f = torch.compile(fn, fullgraph=True, dynamic=dynamic, backend=backend)
            self._compiled[name] = f
        return f

    @torch.no_grad()     # inference only: grad mode is part of a compiled graph's guards (and taints the caches)
    def call(self, name: str, fn, *args):
        """Run fn(*args) in this object's mode; `args` are Python ints (static per captured graph)."""
        if self.mode == "eager":
            return fn(*args)
        with _on_own_device(self):
            return self._call_fast(name, fn, *args)

    def _call_fast(self, name: str, fn, *args):
        try:
            if self.mode == "compiled":
                return self._compile(name, fn, dynamic=True)(*args)
            key = (name, *args)
            g = self._graphs.get(key)
            if g is None:
                f = self._compile(name, fn, dynamic=True)   # one compile; each capture fixes its ints
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(2):      # compile and warm kernels/allocator outside the capture
                        self._warm(f, args)
                torch.cuda.current_stream().wait_stream(s)
                g = torch.cuda.CUDAGraph()
                if self._pool is None:        # one memory pool for all of this object's graphs
                    self._pool = torch.cuda.graph_pool_handle()
                with torch.cuda.graph(g, pool=self._pool):
                    f(*args)
                self._graphs[key] = g
            g.replay()
            return None
        except Exception as e:   # a failed compile or capture costs speed, never results
            self.fallback = f"{self.mode} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); running eager"
            warnings.warn("dar-fast engine: " + self.fallback)
            self.mode = "eager"
            self.restore()
            return fn(*args)

    def _warm(self, f, args):
        """Warm-up runs mutate the buffers; subclasses snapshot and restore them around it."""
        snap = self.snapshot()
        try:
            f(*args)
        finally:
            self.restore(snap)

    def snapshot(self):
        return None

    def restore(self, snap=None):
        pass


class DecodeStep(_Runner):
    """Static buffers and the AR decode step for one (batch, guidance, sampling settings)."""

    def __init__(self, ar, batch: int, guided: bool, temperature: float, top_k: int, top_p: float, mode: str):
        super().__init__(mode)
        self.ar, self.B, self.guided = ar, batch, guided
        self.rows = 2 * batch if guided else batch
        N, dev = ar.num_tokens, ar.device
        self.N = N
        ar.setup_cache(self.rows)
        self.caches = [layer.attention.kv_cache for layer in ar.layers]     # owned: reinstalled before each run
        self.cache_len = ar.cache_len
        self.pos = torch.zeros(1, dtype=torch.int64, device=dev)            # position j being sampled
        self.logits = torch.zeros(self.rows, ar.vocab_size, dtype=torch.float32, device=dev)
        self.tokens = torch.zeros(batch, N, dtype=torch.int64, device=dev)
        self.seeds = torch.zeros(batch, dtype=torch.int64, device=dev)
        self.ids = torch.zeros(batch, dtype=torch.int64, device=dev)
        self.scales = torch.ones(N, dtype=torch.float32, device=dev)
        # checked once here (the compiled op gets exactly what ops.sample_tokens would pass)
        t32 = _f32(float(temperature))
        self.settings = (t32, int(top_k) if top_k < ar.vocab_size else 0, float(top_p))
        self._eager_settings = (float(temperature), int(top_k), float(top_p))
        base = getattr(ar.layers[0].attention, "rope_base", 10000.0)     # what the model rotates with
        self.attn_backend = attention_backend(torch.empty(1, 1, 1, 1, device=dev, dtype=ar.dtype))
        cos, sin = rope_table(torch.arange(self.cache_len, device=dev), ar.cfg.head_dim, base)   # once
        self.rot_a, self.rot_b = rope_pair_tables(cos, sin)
        a0 = ar.layers[0].attention
        # SwiGLU: the Triton kernel on CUDA (`ops.swiglu`), else the reference itself, chosen once here rather
        # than per call (the dispatch reads the environment: ~10 us a call on a CPU)
        act = ops.swiglu if dev.type == "cuda" else swiglu_ref
        self.shape = (a0.n_head, a0.n_kv, a0.hd, ar.layers[0].attention_norm.eps, act)
        # the C++ op straight away (eager too): `ops.sample_tokens` would re-check the arguments every token
        self.direct_sampler = _st.extension_status()["built"]
        self.weights = []                 # per layer, filled by gather_weights (again before every stream)
        self.gather_weights()
        if mode != "eager" and not self.direct_sampler:
            self.fallback = "the C++ sampler op is not built (it is what the compiled graph calls); running eager"
            self.mode = "eager"

    def install(self):
        """Make the AR model write and read this object's KV buffers (the prefill writes them too)."""
        self.ar.install_cache(self.caches, self.rows)

    def load(self, seeds, ids, scales, prefix: Optional[torch.Tensor]):
        self.install()
        self.gather_weights()
        self.seeds.copy_(seeds)
        self.ids.copy_(ids)
        if scales is None:
            self.scales.fill_(1.0)
        else:
            self.scales.copy_(scales)
        P = 0 if prefix is None else prefix.shape[1]
        if P:
            self.tokens[:, :P] = prefix
        self.pos.fill_(P)
        return P

    def snapshot(self):
        return (self.pos.clone(), self.logits.clone(), self.tokens.clone())

    def restore(self, snap=None):
        if snap is not None:
            self.pos.copy_(snap[0])
            self.logits.copy_(snap[1])
            self.tokens.copy_(snap[2])

    static = False      # tests set it: the captured variant (device-side length) run eagerly on CPU

    def run(self, start: int, end: int):
        """Tokens start..end-1 (pos must be at start); no host sync in between."""
        for j in range(start, end):
            if self.mode == "captured" or self.static:
                self.call("decode_static", self.step_static)
            else:
                self.call("decode", self.step, j + 2)

    # ------------------------------------------------------------------ the step itself
    def step(self, n: int):
        """n = j + 2 used cache slots after this step writes slot j+1 (class token + tokens 0..j)."""
        self._step(n)

    def step_static(self):
        self._step(None)

    def gather_weights(self):
        """The tensors one step reads, per layer, into the one list the step uses (refilled in place, so a
        compiled graph's guards see the same list): direct references instead of module calls save the
        nn.Module dispatch (~5 us per call on a CPU; 7 calls per layer). The merged w1/w3 copy must be
        current (the stream calls `refresh_fused` first)."""
        ar = self.ar
        w = [(l.attention_norm.weight, l.attention.wqkv.weight, l.attention.wo.weight, l.ffn_norm.weight,
              l.feed_forward._fused.get()[0], l.feed_forward.w2.weight) for l in ar.layers]
        changed = any(a is not b for old, new in zip(self.weights, w) for a, b in zip(old, new))
        if changed or len(w) != len(self.weights):
            self.weights[:] = w

    def _step(self, n: Optional[int]):
        ar, B = self.ar, self.B
        j = self.pos
        c, u = (self.logits[:B], self.logits[B:]) if self.guided else (self.logits, None)
        scale = self.scales.index_select(0, j).expand(B)
        t = self._sample(c, u, scale, j.expand(B))
        self.tokens.index_copy_(1, j, t[:, None])
        # rows as 2D (R, D) activations: F.linear on (R,1,D) takes a slower path on CPU (26 vs 13 us for a
        # (2,128)x(128,384) GEMM, 1 thread; the same result bit for bit)
        x = F.embedding(torch.cat([t, t]) if self.guided else t, ar.tok_embeddings.weight)       # (rows, D)
        slot = j + 1                      # token j sits at sequence slot j+1 (slot 0: class token)
        rot = self.rot_a.index_select(0, slot), self.rot_b.index_select(0, slot)      # (1,1,1,hd/2,2) each
        for w, cache in zip(self.weights, self.caches):
            x = _decode_block(x, w, rot, slot, cache, n, self.attn_backend, self.shape)
        # the head: final RMSNorm, output projection; copy_ widens to the float32 logits as ar.head's .float()
        self.logits.copy_(F.linear(rms_norm(x, ar.norm.weight, ar.norm.eps), ar.output.weight))
        self.pos.add_(1)

    def _sample(self, c, u, scale, positions):
        """The keyed sampler. The registered C++ op itself when it is built (and always under torch.compile,
        whose graph keeps it through its fake implementation): its arguments were checked once, when this
        object was built. Without the extension (eager only), `ops.sample_tokens`, the reference."""
        if self.direct_sampler or torch.compiler.is_compiling():
            temperature, top_k, top_p = self.settings
            return torch.ops.dar_fast.sample_tokens(c, u, None if u is None else scale, 1.0, temperature, top_k,
                                                    top_p, self.seeds, self.ids, positions, 0)
        temperature, top_k, top_p = self._eager_settings
        return ops.sample_tokens(c, u, cfg_scale=scale if u is not None else 1.0, temperature=temperature,
                                 top_k=top_k, top_p=top_p, seeds=self.seeds, sample_ids=self.ids, positions=positions)


def rope_pair_tables(cos: torch.Tensor, sin: torch.Tensor):
    """(cos, sin) (L, hd/2) -> (a, b), each (L, 1, 1, hd/2, 2): a = (cos, cos), b = (-sin, sin) per pair, so the
    pairwise rotation is x * a + swap(x) * b, 4 ops on q and k together instead of `rotate`'s ~12 per tensor.
    Bit-identical to `rotate`: x0*c + x1*(-s) == c*x0 - s*x1 and x1*c + x0*s == s*x0 + c*x1 in IEEE arithmetic
    (products commute, a + (-b) == a - b, sums commute)."""
    a = torch.stack([cos, cos], dim=-1)[:, None, None]
    b = torch.stack([-sin, sin], dim=-1)[:, None, None]
    return a.contiguous(), b.contiguous()


def rotate_pairs(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x (..., H, hd) rotated pairwise (2i, 2i+1) in float32 by `rope_pair_tables` rows (broadcast to
    (..., H, hd/2, 2))."""
    xf = x.float()
    x2 = xf.view(*xf.shape[:-1], -1, 2)
    return (x2 * a + x2.flip(-1) * b).view(x.shape).to(x.dtype)


def _decode_block(x, w, rot, slot, cache, n, backend, shape):
    """One Llama block on one new token per row (x (R,D)): K/V written at `slot`, attention over slots < n
    (or < slot + 1 read from the device when n is None). The same arithmetic as `TransformerBlock` with the
    cache: ~18 ops (RMSNorm, QKV GEMM, RoPE on q and k together, 2 cache writes, attention, wo GEMM + add,
    RMSNorm, merged w1/w3 GEMM, SwiGLU, w2 GEMM + add)."""
    norm1, wqkv, wo, norm2, w13, w2 = w
    Hq, Hk, hd, eps, act = shape
    R, D = x.shape
    qkv = F.linear(rms_norm(x, norm1, eps), wqkv)                                     # (R, (Hq+2Hk)hd)
    qk = rotate_pairs(qkv[:, :(Hq + Hk) * hd].view(R, Hq + Hk, 1, hd), *rot)          # (R,Hq+Hk,1,hd)
    qt = qk[:, :Hq]                                                                   # (R,Hq,1,hd)
    cache.k_cache.index_copy_(2, slot, qk[:, Hq:])
    cache.v_cache.index_copy_(2, slot, qkv[:, (Hq + Hk) * hd:].view(R, Hk, 1, hd))
    if n is None:
        o = decode_attention(qt, cache.k_cache, cache.v_cache, slot + 1, backend)
    else:   # the used prefix only: slots 0..j+1, every one visible to the single query
        kc, vc = cache.k_cache[:, :, :n], cache.v_cache[:, :, :n]
        o = F.scaled_dot_product_attention(qt, _rep(kc, qt), _rep(vc, qt))
    x = x + F.linear(o.reshape(R, D), wo)                                             # (R,Hq,1,hd) -> (R,D)
    h = F.linear(rms_norm(x, norm2, eps), w13)
    return x + F.linear(swiglu_ref(h) if torch.compiler.is_compiling() else act(h), w2)


class TokenizerStep(_Runner):
    """Static buffers and the tokenizer's per-group work for one batch size and image size."""

    def __init__(self, tok, batch: int, size, mode: str):
        super().__init__(mode)
        self.tok, self.B = tok, batch
        dev = tok.device
        N, G = tok.num_tokens, tok.group_size
        self.N, self.G = N, G
        Dd = tok.cfg.decoder_dim
        self.cache = tok.new_cond_cache(batch)
        self.cond = torch.zeros(batch, N, Dd, dtype=tok.dtype, device=dev)
        H, W = size
        self.x = torch.zeros(batch, 3, H, W, dtype=torch.float32, device=dev)
        self.v_prev = torch.zeros_like(self.x)
        self.image = torch.zeros(batch, *tok.resize_output(self.x[:1]).shape[2:], 3, dtype=torch.uint8, device=dev)
        self.t = torch.zeros(2, dtype=torch.float32, device=dev)          # (t_i, t_{i+1}) of the current step
        self.coef = torch.zeros(2, dtype=torch.float32, device=dev)       # d = coef0 * v - coef1 * v_prev
        self.tokens: Optional[torch.Tensor] = None                         # the DecodeStep's token buffer
        self.inv_std = 1.0 / tok.cfg.diff_decoder.data_std

    def snapshot(self):
        return (self.x.clone(), self.v_prev.clone(), self.cond.clone(), [(k.clone(), v.clone()) for k, v in self.cache])

    def restore(self, snap=None):
        if snap is not None:
            self.x.copy_(snap[0])
            self.v_prev.copy_(snap[1])
            self.cond.copy_(snap[2])
            for (k, v), (k0, v0) in zip(self.cache, snap[3]):
                k.copy_(k0)
                v.copy_(v0)

    def load(self, tokens: torch.Tensor, noise: torch.Tensor):
        self.tokens = tokens
        self.x.copy_(noise)
        self.v_prev.zero_()

    # ------------------------------------------------------------------ cond: decoder layers on one group
    def cond_group(self, g: int):
        self.call("cond", self.cond_step, (g + 1) * self.G)

    def cond_step(self, e: int):
        """Condition tokens of slots [e-G, e) from their codes, K/V of earlier slots cached."""
        tok, G = self.tok, self.G
        s = e - G
        codes = self.tokens[:, s:e]
        x = F.linear(tok.code_vectors(codes), tok.quant_out_conv.weight.flatten(1)) + tok.decoder_embedding.weight[s:e]
        qpos = torch.arange(G, device=x.device) + s
        mask = torch.arange(e, device=x.device)[None, :] <= qpos[:, None]               # (G, e) causal
        for blk, (kb, vb) in zip(tok.decoder_layers, self.cache):
            x = _gated_block_incremental(blk, x, kb, vb, s, e, mask)
        self.cond[:, s:e] = layer_norm(x)

    # ------------------------------------------------------------------ one diffusion step
    def schedule(self, times, solver: str):
        """Load an S-step schedule once per call (one host-to-device copy); steps then copy on the device."""
        S = len(times) - 1
        self.times = torch.tensor(times, dtype=torch.float32).to(self.x.device)
        coef = [[1.0, 0.0] if (i == 0 or solver == "euler") else [1.5, 0.5] for i in range(S)]
        self.coefs = torch.tensor(coef, dtype=torch.float32).to(self.x.device)

    def diffusion(self, i: int, start: int, preview: bool):
        """Step i of the loaded schedule, reading condition tokens [start, start+G); preview -> self.image."""
        self.t.copy_(self.times[i:i + 2])
        self.coef.copy_(self.coefs[i])
        # pass the end (>= G >= 2): a start of 0 would be specialised by the compiler and recompiled later
        if preview:
            self.call("diffusion_preview", self.diffusion_step_preview, start + self.G)
        else:
            self.call("diffusion", self.diffusion_step, start + self.G)

    def diffusion_step(self, end: int):
        self._diffusion(end, False)

    def diffusion_step_preview(self, end: int):
        self._diffusion(end, True)

    def _diffusion(self, end: int, preview: bool):
        tok, B = self.tok, self.B
        x = self.x
        cond = self.cond[:, end - self.G:end]
        v = tok.velocity(x, self.t[0].expand(B), cond)                                   # float32
        d = self.coef[0] * v - self.coef[1] * self.v_prev
        if preview:
            # the same update straight to t = 1, then as `Tokenizer.decode`: x * (1/std), resize, uint8
            img = tok.resize_output((x + (1.0 - self.t[0]) * d) * self.inv_std)
            self.image.copy_(ops.images_to_uint8(img))
        self.x.copy_(x + (self.t[1] - self.t[0]) * d)
        self.v_prev.copy_(v)


def _gated_block_incremental(blk, x, kb, vb, s, e, mask):
    """GatedBlock on the new tokens at slots [s, e): K/V written into (kb, vb), attention over slots < e."""
    a = blk.attention
    B, T, D = x.shape
    H, hd = a.num_heads, a.head_dim
    h = blk.norm1(x)
    q, k, v = a.project(h)
    kb[:, :, s:e] = k.transpose(1, 2)
    vb[:, :, s:e] = v.transpose(1, 2)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), kb[:, :, :e], vb[:, :, :e], attn_mask=mask)
    x = x + blk.gate1 * a.proj(o.transpose(1, 2).reshape(B, T, D))
    return x + blk.gate2 * blk.mlp(blk.norm2(x))
