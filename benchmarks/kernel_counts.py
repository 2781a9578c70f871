"""Kernels per decode step and per tokenizer step, counted with torch.profiler (used by bench_sampling.py).

A "kernel" is, on CUDA, a device kernel the profiler records; on CPU, a leaf ATen op (one with no ATen op
below it) that is not a view or metadata op, plus every inductor-generated C++ kernel inside a compiled
region (recorded because this module turns on inductor's `cpp.enable_kernel_profile`, which makes each
generated kernel a profiler event; it costs ~1 us per kernel, so compiled timings here are, if anything,
pessimistic).
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from dar_fast import ops

try:
    import torch._inductor.config as _ind
    _ind.cpp.enable_kernel_profile = True
except Exception:  # pragma: no cover
    pass

# ops that only make views or read metadata (no data movement, no launch)
_META = {"aten::view", "aten::as_strided", "aten::transpose", "aten::reshape", "aten::_reshape_alias", "aten::select",
         "aten::slice", "aten::unsqueeze", "aten::squeeze", "aten::expand", "aten::t", "aten::detach",
         "aten::empty", "aten::empty_strided", "aten::permute", "aten::alias", "aten::chunk", "aten::split",
         "aten::split_with_sizes", "aten::narrow", "aten::unbind", "aten::_unsafe_view", "aten::resolve_conj",
         "aten::resolve_neg", "aten::lift_fresh", "aten::empty_like", "aten::result_type", "aten::expand_as",
         "aten::contiguous", "aten::view_as", "aten::flatten", "aten::unflatten", "aten::is_nonzero",
         "aten::_local_scalar_dense", "aten::item", "aten::set_", "aten::dim", "aten::size", "aten::stride",
         "aten::numel", "aten::is_same_size", "aten::unsafe_split", "aten::unsafe_chunk", "aten::broadcast_tensors"}


def _is_op(name: str) -> bool:
    return name.startswith("aten::") or name.startswith("dar_fast::")


def _count(fn, cuda: bool):
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    names = Counter()
    for e in prof.events():
        if cuda:
            if e.device_type == torch.autograd.DeviceType.CUDA:
                names[e.name[:60]] += 1
            continue
        if "cpp_fused" in e.name or "cpp_kernel" in e.name:
            names["inductor:" + e.name.split("cpp_fused")[-1][:40]] += 1
        elif _is_op(e.name) and e.name not in _META and not any(_is_op(c.name) and c.name not in _META
                                                                 for c in e.cpu_children):
            # a leaf among compute ops: aten::mm calls resolve_conj and SDPA allocates and transposes below it
            names[e.name] += 1
    return sum(names.values()), [f"{n} x{c}" for n, c in names.most_common(8)]


@torch.no_grad()
def count_decode_kernels(pipe, labels, cfg, tok=None, ar=None) -> dict:
    """One decode step at position 3: the reference (ops.sample_tokens + ARModel.decode_one) when pipe is None,
    else the pipeline's DecodeStep in its mode (run a sample first so that it exists)."""
    B = labels.numel()
    if pipe is None:
        dev = ar.device
        ar.setup_cache(2 * B)
        lab = torch.cat([labels, torch.full_like(labels, ar.null_class)]).to(dev)
        logits = ar.prefill(lab)
        seeds, ids = torch.zeros(B, dtype=torch.int64, device=dev), torch.arange(B, device=dev)

        def step():
            t = ops.sample_tokens(logits[:B], logits[B:], cfg_scale=float(cfg), seeds=seeds, sample_ids=ids,
                                  positions=3)
            ar.decode_one(torch.cat([t, t]), 4)
        cuda = dev.type == "cuda"
    else:
        key = next(k for k in pipe._engine_steps if k[0] == "decode" and k[1] == B)
        dec = pipe._engine_steps[key]
        dec.pos.fill_(3)

        def step():
            dec.run(3, 4)
        cuda = pipe.device.type == "cuda"
    step()
    n, top = _count(step, cuda)
    return {"decode_kernels_per_step": n, "decode_top_kernels": top}


@torch.no_grad()
def count_tokenizer_kernels(pipe, labels, cfg, tok=None) -> dict:
    """Per diffusion step (velocity + flow update) and for the condition tokens: the reference (Tokenizer.decode's
    loop body; cond over all N tokens once) or the engine's TokenizerStep (cond per group, step with preview)."""
    B = labels.numel()
    if pipe is None:
        dev = tok.device
        codes = torch.randint(0, tok.codebook_size, (B, tok.num_tokens), device=dev)
        x = torch.randn(B, 3, *tok.image_size, device=dev)
        cond = tok.cond(codes)
        G = tok.group_size

        def diff():
            v = tok.velocity(x, 0.5, cond[:, G:2 * G])
            ops.flow_step(x, v, v, 0.5, 0.6)

        def cond_all():
            tok.cond(codes)
        cuda = dev.type == "cuda"
        nd, topd = _count(diff, cuda)
        nc, _ = _count(cond_all, cuda)
        return {"tokenizer_step_kernels": nd, "tokenizer_step_top_kernels": topd, "cond_kernels_all_tokens": nc}
    key = next(k for k in pipe._engine_steps if k[0] == "tokenizer" and k[1] == B)
    ts = pipe._engine_steps[key]
    cuda = pipe.device.type == "cuda"

    def diff():
        ts.diffusion(1, ts.G, preview=True)

    def cond_group():
        ts.cond_group(1)
    diff()
    cond_group()
    nd, topd = _count(diff, cuda)
    nc, _ = _count(cond_group, cuda)
    return {"tokenizer_step_kernels": nd, "tokenizer_step_top_kernels": topd,
            "cond_kernels_per_group": nc, "cond_kernels_all_tokens": nc * pipe.tok.num_groups}
