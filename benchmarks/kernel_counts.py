"""Kernels per decode step and per tokenizer step, counted with torch.profiler (used by bench_sampling.py).

A "kernel" is, on CUDA, a device kernel the profiler records; on CPU, a leaf ATen op (one with no ATen op
below it) that is not a view or metadata op, plus every inductor-generated C++ kernel inside a compiled
region (recorded because this module turns on inductor's `cpp.enable_kernel_profile`, which makes each
generated kernel a profiler event; it costs ~1 us per kernel, so compiled timings here are, if anything,
pessimistic).

Compiled counts of the released AR presets without compiling 24 / 36 layers (`count_decode_layers`): the
preset's exact layer shapes are built with n_layer=1 and n_layer=2, each decode step compiled and counted;
per layer = count(2) - count(1), and the step of L layers = count(1) + (L - 1) * per layer, a derived figure
that is exact when every layer is the same code on the same shapes (true of the Llama blocks here). The same
derivation in eager mode is checked against the eager count of the full-depth model.

    python benchmarks/kernel_counts.py --compiled-presets D-AR-L D-AR-XL --out counts.json
"""
from __future__ import annotations

import copy
import os
import sys
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


def _dynamo_graphs() -> int:
    try:
        from torch._dynamo.utils import counters
        return int(counters["stats"]["unique_graphs"])
    except Exception:      # pragma: no cover
        return 0


@torch.no_grad()
def _decode_step_for(acfg, n_layer: int, mode: str, batch: int, cfg: float, device="cpu"):
    """An ARModel with `acfg`'s layer shapes and n_layer layers (random weights, a 16-token cache: the counts do
    not depend on the sequence length) and a loaded, prefilled engine DecodeStep over it."""
    from dar_fast.defaults import LIBRARY_DEFAULTS
    from dar_fast.engine_graphs import DecodeStep
    from dar_fast.models import ARModel
    c = copy.deepcopy(acfg)
    c.n_layer, c.block_size = n_layer, 16
    torch.manual_seed(0)
    ar = ARModel(c).to(device).eval()
    for q in ar.parameters():            # released init zeroes some outputs; random weights count the same
        q.normal_(0, 0.02)
    d = LIBRARY_DEFAULTS
    dec = DecodeStep(ar, batch, True, d["temperature"], d["top_k"], d["top_p"], mode)
    dev = torch.device(device)
    dec.load(torch.zeros(batch, dtype=torch.int64, device=dev), torch.arange(batch, device=dev),
             torch.full((ar.num_tokens,), float(cfg), device=dev), None)
    lab = torch.zeros(batch, dtype=torch.int64, device=dev)
    dec.logits.copy_(ar.prefill(torch.cat([lab, torch.full_like(lab, ar.null_class)])))
    return ar, dec


def count_decode_layers(name: str, acfg, mode: str = "compiled", batch: int = 1, cfg: float = 4.0,
                        progress=None) -> dict:
    """Kernels per decode step of preset `name` (config `acfg`) in `mode`, measured at n_layer 1 and 2 and
    derived for the preset's depth (see the module docstring)."""
    cuda = False
    measured, top, modes, compiles = {}, {}, {}, {}
    for L in (1, 2):
        if progress:
            progress(f"{name}: {mode} decode step, n_layer={L} (building{' and compiling' if mode != 'eager' else ''})")
        ar, dec = _decode_step_for(acfg, L, mode, batch, cfg)

        def step():
            dec.run(3, 4)
        dec.pos.fill_(3)
        step()                                   # compile (and warm) outside the count
        dec.pos.fill_(3)                         # outside the count: not part of a decode step
        c0 = _dynamo_graphs()
        measured[L], top[L] = _count(step, cuda)
        compiles[L] = _dynamo_graphs() - c0      # 0: the counted step ran the compiled graph, nothing new
        modes[L] = dec.mode if dec.fallback is None else f"{dec.mode} (fallback: {dec.fallback})"
    per_layer = measured[2] - measured[1]
    return {"model": name, "impl": f"kernels-engine-{mode}-by-layers", "batch": batch, "counted_on": "cpu",
            "n_layer": acfg.n_layer, "dim": acfg.dim, "n_head": acfg.n_head, "vocab_size": acfg.vocab_size,
            "modes_run": sorted(set(modes.values())), "compiles_while_counting": compiles,
            "decode_kernels_measured_n_layer_1": measured[1], "decode_kernels_measured_n_layer_2": measured[2],
            "decode_kernels_per_layer": per_layer,
            "decode_kernels_per_step_derived": measured[1] + (acfg.n_layer - 1) * per_layer,
            "derivation": f"count(1) + (n_layer - 1) * (count(2) - count(1)) = {measured[1]} + "
                          f"{acfg.n_layer - 1} * {per_layer}",
            "decode_top_kernels_n_layer_2": top[2]}


@torch.no_grad()
def count_decode_full(name: str, acfg, mode: str = "eager", batch: int = 1, cfg: float = 4.0) -> dict:
    """The same step counted on the full-depth model (eager: cheap; checks the by-layers derivation)."""
    ar, dec = _decode_step_for(acfg, acfg.n_layer, mode, batch, cfg)

    def step():
        dec.run(3, 4)
    dec.pos.fill_(3)
    step()
    dec.pos.fill_(3)
    n, top = _count(step, False)
    return {"model": name, "impl": f"kernels-engine-{mode}", "batch": batch, "counted_on": "cpu",
            "n_layer": acfg.n_layer, "decode_kernels_per_step": n, "decode_top_kernels": top}


def compiled_preset_rows(presets, batch: int = 1, cfg: float = 4.0, check_eager: bool = True, progress=None):
    """Rows for each preset: compiled by layers (measured 1 and 2, derived L), and with check_eager the eager
    by-layers derivation next to the eager full-depth count (equal when the derivation is exact)."""
    from dar_fast.config import ar_config
    rows = []
    for item in presets:                    # a preset name, or (name, ARConfig)
        name, acfg = (item, ar_config(item)) if isinstance(item, str) else item
        rows.append(count_decode_layers(name, acfg, "compiled", batch, cfg, progress))
        if check_eager:
            if progress:
                progress(f"{name}: eager check of the derivation")
            by = count_decode_layers(name, acfg, "eager", batch, cfg)
            full = count_decode_full(name, acfg, "eager", batch, cfg)
            by["full_depth_count"] = full["decode_kernels_per_step"]
            by["derivation_exact"] = by["decode_kernels_per_step_derived"] == full["decode_kernels_per_step"]
            rows.append(by)
    return rows


def main():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import common_args, default_out, print_row, resolve_device, write_results
    p = common_args("Kernels per decode step of the released presets, compiled on CPU, measured by layers")
    p.add_argument("--compiled-presets", nargs="+", default=["D-AR-L", "D-AR-XL"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-eager-check", action="store_true", help="skip the eager full-depth check")
    args = p.parse_args()
    device = resolve_device("cpu" if args.device == "auto" else args.device)
    if device.type != "cpu":
        raise SystemExit("kernel_counts.py: counts compiled steps on the CPU (--device cpu)")
    torch.set_num_threads(args.threads)
    presets = args.compiled_presets
    if args.smoke:      # a 3-layer toy with the same block code (CI: seconds with DAR_FAST_COMPILE_BACKEND=eager)
        from dar_fast.config import ARConfig
        presets = [("smoke", ARConfig(dim=64, n_layer=3, n_head=2, vocab_size=64, block_size=16, num_classes=10))]
    rows = compiled_preset_rows(presets, args.batch, args.cfg, not args.no_eager_check,
                                progress=lambda m: print(m, file=sys.stderr, flush=True))
    for r in rows:
        print_row(r)
    out = args.out or default_out("kernel-counts", device, args.smoke)
    write_results(out, "kernel_counts", rows, device, smoke=args.smoke, extra={"threads": torch.get_num_threads()})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
