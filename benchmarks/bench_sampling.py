"""Sampling: the engine (eager / compiled / captured) against the reference sampler and the released structure.

Per model and batch, runs alternate within one process (reference, released, engine modes, repeated), and each
repetition's ratio reference_ms / engine_ms is recorded, with the tokens checked identical to the reference.
The JSON records what actually ran (C++ sampler extension, engine mode per step object and any fallback,
attention backend), dtype, threads and load average, ms per decode step, and kernels per decode step and per
tokenizer step counted with torch.profiler (leaf ATen ops that are not views; inside compiled regions the
inductor kernels, recorded with `cpp.enable_kernel_profile`). The "released" row is the released code's
structure in plain PyTorch: every token through the KV-cache loop with softmax + torch.multinomial, then the
whole decode (its tokens differ from the keyed sampler's by design; it is timed, not compared).
Every timed figure is taken warm, and each row's `compiles` says how many graphs torch._dynamo compiled
during each measurement (`dynamo_graphs`): the stage split (ar_ms / tokenizer_ms) and ms_per_decode_step
each run an untimed pass first; a nonzero count in a timed measurement is listed in
`timing_included_compile` and printed as a warning instead of passing silently. (The first CPU digits JSON
had ar_ms 61 s and 4150 ms per decode step at batch 1 compiled against a 300 ms total: its decode re-run
ran outside no_grad, and grad mode is a guard of every compiled graph, so it recompiled; see
`ms_per_decode_step`.)

    python benchmarks/bench_sampling.py --device cpu                      # digits model, batches 1 and 8
    python benchmarks/bench_sampling.py --device cpu --count-presets D-AR-L D-AR-XL   # + kernel counts
    python benchmarks/bench_sampling.py --device cpu --compiled-presets D-AR-L D-AR-XL   # + compiled, by layers
    python benchmarks/bench_sampling.py                                   # GPU: D-AR-L/XL/XXL, random weights
    python benchmarks/bench_sampling.py --smoke --device cpu              # tiny CI run
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import common_args, default_out, device_info, print_row, resolve_device, write_results  # noqa: E402

from dar_fast import engine  # noqa: E402
from dar_fast.config import ARConfig, DiffDecoderConfig, TokenizerConfig, ar_config, tokenizer_config  # noqa: E402
from dar_fast.kernels.sample_tokens import extension_status  # noqa: E402
from dar_fast.models import ARModel, Tokenizer  # noqa: E402
from dar_fast.pipeline import Pipeline  # noqa: E402
from dar_fast.sampler import reference_sample  # noqa: E402
from dar_fast.seeding import resolve_keys, sample_noise  # noqa: E402

from kernel_counts import compiled_preset_rows, count_decode_kernels, count_tokenizer_kernels  # noqa: E402


def build(tok_cfg: TokenizerConfig, ar_cfg: ARConfig, device, dtype):
    torch.manual_seed(0)
    tok = Tokenizer(tok_cfg).to(device=device, dtype=dtype).eval()
    ar = ARModel(ar_cfg).to(device=device, dtype=dtype).eval()
    with torch.no_grad():      # released init zeroes gates / output layers; random weights time the same
        for p in list(tok.parameters()) + list(ar.parameters()):
            p.normal_(0, 0.02)
    return tok, ar


def smoke_configs():
    """A tokenizer and AR model small enough to time on a CPU in seconds."""
    tok_cfg = TokenizerConfig(encoder_patch_size=8, num_encoder_layers=1, num_decoder_layers=1, encoder_dim=64,
                              decoder_dim=64, vq_codebook_size=64, num_denoising_steps=4, num_query_groups=4,
                              num_all_queries=16, queries_per_step=4, sampling_resolution=32, repa_head=False,
                              diff_decoder=DiffDecoderConfig(dim=64, cond_dim=64, patch_size=4, depth=1))
    return tok_cfg, {"smoke": ARConfig(dim=64, n_layer=2, n_head=2, vocab_size=64, block_size=16, num_classes=10)}


def small_tokenizer_config(acfg: ARConfig) -> TokenizerConfig:
    """A 32x32 tokenizer giving the AR model its released sequence: block_size tokens in groups of 32, codebook
    of the AR vocabulary; the decoder is small so the timing is the AR phase's."""
    N = acfg.block_size
    return TokenizerConfig(encoder_patch_size=8, num_encoder_layers=1, num_decoder_layers=1, encoder_dim=64,
                           decoder_dim=64, vq_codebook_size=acfg.vocab_size, num_denoising_steps=N // 32,
                           num_query_groups=N // 32, num_all_queries=N, queries_per_step=32, sampling_resolution=32,
                           repa_head=False, diff_decoder=DiffDecoderConfig(dim=64, cond_dim=64, patch_size=4, depth=1))


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def dynamo_graphs() -> int:
    """Graphs torch._dynamo has produced in this process so far: every compile and every recompile adds one
    (`counters["stats"]["unique_graphs"]`). A timed pass during which it moves timed a compile, not the step."""
    try:
        from torch._dynamo.utils import counters
        return int(counters["stats"]["unique_graphs"])
    except Exception:      # pragma: no cover - no dynamo in this torch
        return 0


def stage_profile(pipe: Pipeline, labels, cfg) -> tuple:
    """({'ar','tokenizer'} seconds, {'warmup', 'timed'} graphs compiled) of one warm profiled pass.

    A pass without a profile runs first: a profiled stream takes the same graphs, but whatever the call still
    has to compile (a specialisation the timed runs did not reach, a guard another pipeline on the same model
    invalidated) is compiled there and not inside the laps."""
    c0 = dynamo_graphs()
    list(pipe.stream(labels, cfg=cfg, previews=False))
    c1 = dynamo_graphs()
    prof = {}
    list(pipe.stream(labels, cfg=cfg, previews=False, profile=prof))
    return prof, {"warmup": c1 - c0, "timed": dynamo_graphs() - c1}


def time_engine(pipe: Pipeline, batch: int, cfg, reps: int, compiles: Optional[dict] = None):
    """(best seconds, {'ar','tokenizer'} split, seconds to the first preview at batch 1) of pipe.stream (bench_fid).
    compiles (optional dict) receives the graphs compiled in the warm-up, the timed repetitions and the profile."""
    labels = torch.arange(batch) % pipe.num_classes
    c0 = dynamo_graphs()
    pipe.sample(labels, cfg=cfg)                                     # warm up (compile, capture)
    c1 = dynamo_graphs()
    best, first_preview = float("inf"), None
    for _ in range(reps):
        sync(pipe.device)
        t0 = time.perf_counter()
        for step in pipe.stream(labels, cfg=cfg, previews=batch == 1):
            if step.step == 0 and first_preview is None and batch == 1:
                first_preview = time.perf_counter() - t0
        sync(pipe.device)
        best = min(best, time.perf_counter() - t0)
    c2 = dynamo_graphs()
    prof, pc = stage_profile(pipe, labels, cfg)
    if compiles is not None:
        compiles.update(warmup=c1 - c0 + pc["warmup"], timed_reps=c2 - c1, profile=pc["timed"])
    return best, prof, first_preview


@torch.no_grad()
def released_sample(tok, ar, labels, cfg: float):
    """The released generate's structure: KV-cache loop, CFG, softmax + torch.multinomial per token, then decode."""
    B, N = labels.numel(), tok.num_tokens
    dev = ar.device
    lab = torch.cat([labels, torch.full_like(labels, ar.null_class)]).to(dev)
    ar.setup_cache(2 * B)
    logits = ar.prefill(lab)
    tokens = torch.empty(B, N, dtype=torch.int64, device=dev)
    for j in range(N):
        c, u = logits[:B], logits[B:]
        probs = torch.softmax(u + (c - u) * cfg, dim=-1)
        t = torch.multinomial(probs, 1)[:, 0]
        tokens[:, j] = t
        if j < N - 1:
            logits = ar.decode_one(torch.cat([t, t]), j + 1)
    seeds, ids = resolve_keys(0, B)
    noise = sample_noise(seeds, ids, (3, *tok.image_size)).to(dev)
    return tok.decode(tokens, noise=noise)


@torch.no_grad()     # grad mode is part of every compiled graph's guards: a run under grad would recompile
def ms_per_decode_step(pipe, B, cfg) -> tuple:
    """(ms per step, graphs compiled during the timed pass) of the engine's decode steps alone: N steps re-run
    over the buffers of the last call, once untimed (anything still to compile compiles there), then timed."""
    key = next(k for k in pipe._engine_steps if k[0] == "decode" and k[1] == B)
    dec = pipe._engine_steps[key]
    N = dec.N
    dec.install()             # this object's KV buffers (another pipeline on the same model may have run since)
    dec.pos.fill_(0)
    dec.run(0, N)
    dec.pos.fill_(0)
    c0 = dynamo_graphs()
    sync(pipe.device)
    t0 = time.perf_counter()
    dec.run(0, N)
    sync(pipe.device)
    return (time.perf_counter() - t0) * 1e3 / N, dynamo_graphs() - c0


def count_model(name, tok, ar, batches, cfg, modes, rows):
    """Kernel counts only (no timing): reference and each engine mode."""
    for B in batches:
        labels = torch.arange(B) % ar.num_classes
        for m in modes:
            p = Pipeline(tokenizer=tok, ar=ar)
            p.engine_mode = m
            p.sample(labels, cfg=cfg)
            rec = dict(model=name, batch=B, impl=f"kernels-engine-{m}", counted_on=str(ar.device),
                       n_layer=ar.cfg.n_layer, **count_decode_kernels(p, labels, cfg),
                       **count_tokenizer_kernels(p, labels, cfg))
            rows.append(rec)
            print_row(rec)
        rec = dict(model=name, batch=B, impl="kernels-reference", counted_on=str(ar.device), n_layer=ar.cfg.n_layer,
                   **count_decode_kernels(None, labels, cfg, tok=tok, ar=ar),
                   **count_tokenizer_kernels(None, labels, cfg, tok=tok))
        rows.append(rec)
        print_row(rec)


def bench_model(name, tok, ar, batches, reps, cfg, modes, rows, count=True):
    dev = ar.device
    pipes = {m: Pipeline(tokenizer=tok, ar=ar, compile=m != "eager",
                         use_cuda_graphs=m == "captured") for m in modes}
    for m, p in pipes.items():
        p.engine_mode = m
    impls = {"reference": lambda lab: reference_sample(tok, ar, lab, cfg=cfg),
             "released": lambda lab: released_sample(tok, ar, lab, cfg)}
    for m, p in pipes.items():
        impls[f"engine-{m}"] = (lambda p: lambda lab: p.sample(lab, cfg=cfg))(p)
    for B in batches:
        labels = torch.arange(B) % ar.num_classes
        ref = reference_sample(tok, ar, labels, cfg=cfg)
        identical, warm_s, warm_c = {}, {}, {}
        for m, p in pipes.items():
            c0 = dynamo_graphs()
            t0 = time.perf_counter()
            out = p.sample(labels, cfg=cfg)                     # warm-up: compile / capture happen here
            warm_s[m] = time.perf_counter() - t0
            warm_c[m] = dynamo_graphs() - c0
            identical[m] = bool(torch.equal(out.tokens, ref.tokens))
        times = {k: [] for k in impls}
        rep_c = {k: 0 for k in impls}
        for _ in range(reps):                                   # alternated: every impl once per repetition
            for k, f in impls.items():
                c0 = dynamo_graphs()
                sync(dev)
                t0 = time.perf_counter()
                f(labels)
                sync(dev)
                times[k].append((time.perf_counter() - t0) * 1e3)
                rep_c[k] += dynamo_graphs() - c0
        load = os.getloadavg()
        for k, ts in times.items():
            rec = dict(model=name, batch=B, impl=k, ms_min=min(ts), ms_median=sorted(ts)[len(ts) // 2], ms_reps=ts,
                       images_per_s=B / min(ts) * 1e3, loadavg_1m=load[0])
            if k.startswith("engine-"):
                m = k[len("engine-"):]
                p = pipes[m]
                st = engine.status(p)
                prof, stage_c = stage_profile(p, labels, cfg)
                step_ms, step_c = ms_per_decode_step(p, B, cfg)
                rec.update(ratio_vs_reference_per_rep=[r / e for r, e in zip(times["reference"], ts)],
                           ratio_vs_released_per_rep=[r / e for r, e in zip(times["released"], ts)],
                           tokens_identical_to_reference=identical[m], first_call_s=warm_s[m],
                           modes_run=sorted({o["mode"] for o in st["objects"]}), fallbacks=st["fallbacks"],
                           decode_attention=sorted({o["attention"] for o in st["objects"] if o["attention"]}),
                           compiled=all(o["mode"] in ("compiled", "captured") for o in st["objects"]),
                           graph_captured=all(o["mode"] == "captured" for o in st["objects"]),
                           ar_ms=prof.get("ar", 0) * 1e3, tokenizer_ms=prof.get("tokenizer", 0) * 1e3,
                           ms_per_decode_step=step_ms,
                           # graphs dynamo compiled during each measurement (0 = measured warm); the first
                           # call, the stage profile and ms/decode step each get an untimed warm-up pass
                           compiles={"first_call": warm_c[m], "timed_reps": rep_c[k],
                                     "stage_profile_warmup": stage_c["warmup"], "stage_profile": stage_c["timed"],
                                     "decode_step_timing": step_c})
                rec["ratio_vs_reference_median"] = sorted(rec["ratio_vs_reference_per_rep"])[reps // 2]
                hot = {n: c for n, c in rec["compiles"].items()
                       if c and n in ("timed_reps", "stage_profile", "decode_step_timing")}
                rec["timing_included_compile"] = sorted(hot)
                if hot:
                    print(f"warning: {name} batch {B} {k}: compiled during timed work {hot}; those figures "
                          "include compile time", file=sys.stderr)
            else:
                rec["compiles"] = {"timed_reps": rep_c[k]}
            rows.append(rec)
            print_row({k2: v for k2, v in rec.items() if not isinstance(v, list)})
        if count:
            for m, p in pipes.items():
                if m == "captured":
                    continue       # the profiler inside a replayed graph sees one launch; counted eager/compiled
                rec = dict(model=name, batch=B, impl=f"kernels-engine-{m}", **count_decode_kernels(p, labels, cfg),
                           **count_tokenizer_kernels(p, labels, cfg))
                rows.append(rec)
                print_row(rec)
            rec = dict(model=name, batch=B, impl="kernels-reference",
                       **count_decode_kernels(None, labels, cfg, tok=tok, ar=ar),
                       **count_tokenizer_kernels(None, labels, cfg, tok=tok))
            rows.append(rec)
            print_row(rec)


def count_presets(presets, rows, device):
    """Kernels per decode step of the released shapes (random weights, eager engine vs reference)."""
    tok_cfg, _ = smoke_configs()
    for name in presets:
        acfg = ar_config(name)
        acfg.block_size = 16    # kernel counts do not depend on the sequence length; a short cache saves memory
        tok_cfg.num_all_queries, tok_cfg.queries_per_step = 16, 4
        tok_cfg.vq_codebook_size = acfg.vocab_size
        tok, ar = build(tok_cfg, acfg, device, torch.float32)
        pipe = Pipeline(tokenizer=tok, ar=ar, compile=False)
        labels = torch.zeros(1, dtype=torch.int64)
        list(pipe.stream(labels, cfg=4.0, previews=False))
        for impl, p in (("kernels-reference", None), ("kernels-engine-eager", pipe)):
            rec = dict(model=name, batch=1, impl=impl, n_layer=acfg.n_layer, counted_on="cpu",
                       **count_decode_kernels(p, labels, 4.0, tok=tok, ar=ar))
            rec["decode_kernels_per_layer"] = rec["decode_kernels_per_step"] / acfg.n_layer
            rows.append(rec)
            print_row(rec)
        del tok, ar, pipe


def main():
    p = common_args(__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=None, help="AR presets with random weights (GPU default: L XL XXL)")
    p.add_argument("--batches", type=int, nargs="+", default=None)
    p.add_argument("--modes", nargs="+", default=None, help="engine modes (CPU: eager compiled; CUDA: captured)")
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--count-presets", nargs="*", default=[], help="also count kernels per decode step of these")
    p.add_argument("--compiled-presets", nargs="*", default=[],
                   help="also count compiled kernels per decode step of these presets on the CPU, measured at n_layer "
                        "1 and 2 and derived for the full depth (kernel_counts.count_decode_layers)")
    p.add_argument("--counts-only", action="store_true", help="digits model: kernel counts, no timing")
    p.add_argument("--tokenizer", choices=["tokenizer_v1", "small"], default="tokenizer_v1",
                   help="with --presets: the released tokenizer shape, or a 32x32 one with the preset's 256 tokens "
                        "and vocabulary (a CPU can time a released-size AR phase without a 256x256 DiT)")
    args = p.parse_args()
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    info = device_info(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    modes = args.modes or (["captured"] if device.type == "cuda" else ["eager", "compiled"])
    rows = []
    if args.smoke:
        tok_cfg, acfgs = smoke_configs()
        tok, ar = build(tok_cfg, acfgs["smoke"], device, dtype)
        modes = args.modes or ["eager"]
        bench_model("smoke", tok, ar, args.batches or [1, 4], 2, args.cfg, modes, rows)
        model_desc = "smoke"
    elif args.counts_only:
        pipe = Pipeline.from_pretrained("digits", device=device, dtype=dtype)
        count_model("digits", pipe.tok, pipe.ar, args.batches or [1], args.cfg, modes, rows)
        model_desc = "digits (kernel counts only)"
    elif args.presets is None and device.type == "cpu":
        pipe = Pipeline.from_pretrained("digits", device=device, dtype=dtype)
        bench_model("digits", pipe.tok, pipe.ar, args.batches or [1, 8], args.reps, args.cfg, modes, rows)
        model_desc = "digits"
    else:
        for name in args.presets or ["D-AR-L", "D-AR-XL", "D-AR-XXL"]:
            acfg = ar_config(name)
            tok_cfg = small_tokenizer_config(acfg) if args.tokenizer == "small" else tokenizer_config("tokenizer_v1")
            tok_cfg.repa_head = False
            tok, ar = build(tok_cfg, acfg, device, dtype)
            bench_model(name, tok, ar, args.batches or [1, 16, 64, 256], args.reps, args.cfg, modes, rows)
            del tok, ar
            if device.type == "cuda":
                torch.cuda.empty_cache()
        model_desc = f"{args.tokenizer} tokenizer + " + ",".join(args.presets or ["D-AR-L", "D-AR-XL", "D-AR-XXL"])
    if args.count_presets:
        count_presets(args.count_presets, rows, device)
    if args.compiled_presets:
        say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
        for rec in compiled_preset_rows(args.compiled_presets, progress=say):
            rows.append(rec)
            print_row(rec)
    out = args.out or default_out("sampling", device, args.smoke)
    write_results(out, "sampling", rows, device, smoke=args.smoke,
                  extra={"model": model_desc, "cfg": args.cfg, "dtype": str(dtype).replace("torch.", ""),
                         "threads": torch.get_num_threads(), "loadavg": list(os.getloadavg()),
                         "sampler_extension": extension_status(), "device_info": info,
                         "engine_modes": modes})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
