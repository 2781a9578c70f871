"""gpu_check sections 5-12: attention kernels, decode step, engine end to end, tokenizer step, bf16 batch
invariance, decode vs sample and the FID-shard writer, training steps, trimmed benchmarks. See
_gpu_check_ctx.py for the context (Ctx) and the shared models."""
from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
import time

import torch

from _gpu_check_ctx import Ctx, _dt, build_models, run_sub

HERE = os.path.dirname(os.path.abspath(__file__))


def _peak_mem(ctx: Ctx) -> dict:
    if ctx.cuda:
        return dict(peak_gpu_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    return dict(process_max_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))


# ============================================================================ 5 attention kernels

_ATTN_RE = re.compile(r"flash|fmha|attention|attn|sdpa|mha|scaled_dot|softmax|efficient|cudnn", re.I)


def attention_kernels(ctx: Ctx):
    from torch.profiler import ProfilerActivity, profile
    dt = torch.bfloat16 if ctx.cuda else torch.float32
    tok, ar = build_models(ctx, dt)
    B = 4
    labels = torch.arange(B, device=ctx.device) % ar.num_classes
    ar.setup_cache(2 * B)
    logits = ar.prefill(torch.cat([labels, torch.full_like(labels, ar.null_class)]))
    tok_ids = logits.argmax(-1)
    cache = tok.new_cond_cache(B)
    codes = torch.randint(0, tok.codebook_size, (B, tok.group_size), device=ctx.device)
    x = torch.randn(B, 3, *tok.image_size, device=ctx.device, dtype=dt)
    cond = tok.cond_incremental(codes, 0, tok.new_cond_cache(B))
    calls = {"ar_decode_step": lambda: ar.decode_one(tok_ids, 5),
             "tokenizer_decoder_layers": lambda: tok.cond_incremental(codes, 0, cache),
             "dit_velocity": lambda: tok.velocity(x, 0.3, cond)}
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
    from dar_fast import attention
    out = {"dar_fast_attention_backend": attention.backend(), "dtype": _dt(dt)}
    with torch.no_grad():
        for name, fn in calls.items():
            fn()
            ctx.sync()
            with profile(activities=acts) as prof:
                fn()
                ctx.sync()
            ops_, kern = set(), set()
            for e in prof.events():
                nm = e.name
                if not _ATTN_RE.search(nm):
                    continue
                on_dev = str(getattr(e, "device_type", "")).endswith("CUDA")
                (kern if on_dev else ops_).add(nm[:160])
            out[name] = {"aten_ops": sorted(ops_), "gpu_kernels": sorted(kern) if ctx.cuda else "needs CUDA"}
            ctx.check(bool(ops_ or kern), f"{name}: no attention op seen in the profile")
            ctx.put("calls", out)


# ============================================================================ 6 decode-step replay

def decode_step(ctx: Ctx):
    presets = ["D-AR-L", "D-AR-XL"] if ctx.cuda else ["tiny"]
    batches = [1, 16, 64] if ctx.cuda else [1, 4]
    for preset in presets:
        if preset != presets[0] and ctx.time_left() < 20:
            ctx.put(preset, "not run: too little of the section's cap left (XL runs only if time remains)")
            continue
        ctx.attempt(preset, _decode_preset, ctx, preset, batches)


def _decode_preset(ctx: Ctx, preset: str, batches):
    """ms per decode step at a mid-sequence position (K steps per timing), graph-replayed on a GPU.

    The step timed is the engine's own (engine_graphs.DecodeStep.step_static: sample, embed, L layers with
    attention over the used prefix, logits) with eager kernels inside our CUDA graph: no torch.compile, whose
    per-process cost would not fit this section's cap. The engine's compiled + captured step is timed end to end
    in engine_end_to_end (ar_ms_per_token). Without DecodeStep in the tree, the model's decode_one is timed."""
    from torch.profiler import ProfilerActivity, profile

    from dar_fast import ops
    from dar_fast.perf import ar_matmul_params, ar_weight_bytes
    dt = torch.bfloat16 if ctx.cuda else torch.float32
    _, ar = build_models(ctx, dt, preset=preset if ctx.cuda else "D-AR-L")
    info = ctx.ceilings()
    bw = info["mem_bw_gbs"]
    rate = (info.get("bf16_tflops") or 0) if ctx.cuda else None
    try:
        from dar_fast.engine_graphs import DecodeStep
    except ImportError:
        DecodeStep = None
    N = ar.num_tokens
    K = 64 if ctx.cuda else 4
    start = max(0, N // 2 - K // 2)
    res = {}
    for B in batches:
        rows = 2 * B
        labels = torch.arange(B, device=ctx.device) % ar.num_classes
        lab = torch.cat([labels, torch.full_like(labels, ar.null_class)])
        seeds = torch.zeros(B, dtype=torch.int64, device=ctx.device)
        ids = torch.arange(B, device=ctx.device)
        with torch.no_grad():
            if DecodeStep is not None:
                dec = DecodeStep(ar, B, True, 1.0, 0, 1.0, "eager")
                dec.static = True                             # the device-side-length variant a graph replays
                dec.load(seeds, ids, torch.full((N,), 4.0, device=ctx.device), None)
                dec.logits.copy_(ar.prefill(lab))
                step, what = dec.step_static, "engine_graphs.DecodeStep.step_static"

                def reset():
                    dec.pos.fill_(start)
            else:
                ar.setup_cache(rows)
                buf = ar.prefill(lab).float()
                pos = torch.full((1,), start, dtype=torch.int64, device=ctx.device)

                def step():   # CFG + keyed sample, then one AR token for [cond; null] (position fixed)
                    t = ops.sample_tokens(buf[:B], buf[B:], cfg_scale=4.0, seeds=seeds, sample_ids=ids,
                                          positions=pos.expand(B))
                    buf.copy_(ar.decode_one(torch.cat([t, t]), pos + 1))
                what = "ARModel.decode_one + ops.sample_tokens"

                def reset():
                    pass
            reset()
            step()
            reset()
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
            with profile(activities=acts) as prof:
                step()
                ctx.sync()
            if ctx.cuda:
                kernels = sum(1 for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")
                              and not e.name.lower().startswith(("memcpy", "memset")))
                eager = _time_steps(ctx, step, reset, K, 3)
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    reset()
                    step()
                    step()
                torch.cuda.current_stream().wait_stream(s)
                reset()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    step()
                ms = _time_steps(ctx, g.replay, reset, K, 5)
            else:
                kernels = sum(1 for e in prof.events() if e.name.startswith("aten::"))
                ms = eager = _time_steps(ctx, step, reset, K, 2)
        weight_ms = ar_weight_bytes(ar.cfg, 2 if ctx.cuda else 4) / (bw * 1e9) * 1e3
        flop_ms = 2 * ar_matmul_params(ar.cfg) * rows / (rate * 1e12) * 1e3 if rate else 0.0
        floor = max(weight_ms, flop_ms)
        res[f"batch{B}"] = dict(ms_per_step=ms, eager_ms_per_step=eager, step=what, positions=[start, start + K],
                                kernels_per_step=kernels if ctx.cuda else None,
                                aten_ops_per_step=None if ctx.cuda else kernels,
                                floor_ms=floor, weight_read_floor_ms=weight_ms, flop_floor_ms=flop_ms,
                                multiple_of_floor=ms / floor if floor else None,
                                replay="cuda graph" if ctx.cuda else "eager (CPU: no graphs)")
        ctx.put(preset, res)
        del step, reset
        if DecodeStep is not None:
            del dec


def _time_steps(ctx: Ctx, fn, reset, K: int, reps: int) -> float:
    """Median over `reps` of (time of K consecutive calls) / K, in ms; `reset` (untimed) rewinds the position."""
    times = []
    for _ in range(reps):
        reset()
        ctx.sync()
        if ctx.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(K):
                fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / K)
        else:
            t0 = time.perf_counter()
            for _ in range(K):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / K)
    return sorted(times)[len(times) // 2]


# ============================================================================ 7 engine end to end

def _mode(pipe):
    return getattr(pipe, "engine_mode", None) or ("captured" if getattr(pipe, "use_cuda_graphs", False) else "eager")


def _time_engine(ctx: Ctx, pipe, B: int, reps: int):
    """(best seconds per call, {'ar', 'tokenizer'} seconds, seconds to the first preview) after one warm-up."""
    labels = torch.arange(B) % pipe.num_classes
    pipe.sample(labels, cfg=4.0)                     # warm-up: capture / compile / autotune
    best, first = float("inf"), None
    for _ in range(reps):
        ctx.sync()
        t0 = time.perf_counter()
        for i, _step in enumerate(pipe.stream(labels, cfg=4.0, previews=B == 1)):
            if i == 0 and B == 1:
                first = time.perf_counter() - t0 if first is None else min(first, time.perf_counter() - t0)
        ctx.sync()
        best = min(best, time.perf_counter() - t0)
    prof = {}
    list(pipe.stream(labels, cfg=4.0, previews=False, profile=prof))
    return best, prof, first


def engine_end_to_end(ctx: Ctx):
    from dar_fast.perf import floors
    from dar_fast.pipeline import Pipeline
    dt = torch.bfloat16 if ctx.cuda else torch.float32
    tok, ar = build_models(ctx, dt)
    pipe = Pipeline(tok, ar)
    info = ctx.ceilings()
    fl = floors(tok.cfg, ar.cfg, info["mem_bw_gbs"], info.get("bf16_tflops") or 1.0) if ctx.cuda else {}
    for B in ([1, 64] if ctx.cuda else [1, 2]):
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats()
        sec, prof, first = _time_engine(ctx, pipe, B, reps=2 if ctx.cuda else 1)
        rec = dict(batch=B, seconds_per_call=sec, images_per_s=B / sec, ar_s=prof.get("ar"),
                   ar_ms_per_token=(prof.get("ar") or 0) * 1e3 / tok.num_tokens,
                   tokenizer_s=prof.get("tokenizer"), engine_mode=_mode(pipe), dtype=_dt(dt),
                   **_peak_mem(ctx))
        if B == 1:
            rec.update(time_to_first_preview_s=first, time_to_image_s=sec)
            if fl:
                rec["ar_vs_weight_read_floor"] = prof.get("ar", 0) * 1e3 / fl["ar_weight_read_floor_ms"]
        elif fl:
            rec["fraction_of_flop_floor"] = B / sec / fl["flop_floor_images_per_s"]
        ctx.put(f"batch{B}", rec)
    if fl:
        ctx.put("floors", fl)


# ============================================================================ 8 tokenizer step

def tokenizer_step(ctx: Ctx):
    dt = torch.bfloat16 if ctx.cuda else torch.float32
    tok, _ = build_models(ctx, dt)
    for B in ([1, 64] if ctx.cuda else [1, 2]):
        codes = torch.randint(0, tok.codebook_size, (B, tok.group_size), device=ctx.device)
        cache = tok.new_cond_cache(B)
        x = torch.randn(B, 3, *tok.image_size, device=ctx.device, dtype=dt)
        host, dev = [], []
        with torch.no_grad():
            cond = tok.cond_incremental(codes, 0, cache)
            for i in range(8 if ctx.cuda else 3):
                ctx.sync()
                if ctx.cuda:
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                t0 = time.perf_counter()
                tok.velocity(x, 0.3, cond)            # one decoder call: what the engine enqueues per group
                t1 = time.perf_counter()
                if ctx.cuda:
                    b.record()
                    b.synchronize()
                    dev.append(a.elapsed_time(b))
                else:
                    dev.append((t1 - t0) * 1e3)
                host.append((t1 - t0) * 1e3)
        host, dev = sorted(host[1:]), sorted(dev[1:])
        rec = dict(host_enqueue_ms=host[len(host) // 2], device_ms=dev[len(dev) // 2], dtype=_dt(dt),
                   host_bound=host[len(host) // 2] > 0.8 * dev[len(dev) // 2],
                   note=None if ctx.cuda else "CPU: enqueue and execution are one thing")
        from dar_fast.perf import tokenizer_step_flops
        rec["tflops"] = tokenizer_step_flops(tok.cfg) * B / (rec["device_ms"] * 1e-3) / 1e12
        ctx.put(f"batch{B}", rec)


# ============================================================================ 9 bf16 batch invariance

def batch_invariance(ctx: Ctx):
    from dar_fast.pipeline import Pipeline
    dtypes = [torch.bfloat16] if ctx.cuda else [torch.bfloat16, torch.float32]
    for dt in dtypes:
        tok, ar = build_models(ctx, dt)
        pipe = Pipeline(tok, ar)
        labels = [i % ar.num_classes for i in range(8 if ctx.cuda else 4)]
        together = pipe.sample(labels, cfg=4.0, seed=0)             # sample i keyed (0, i)
        per, first_diff, pix = [], [], 0
        for i, lab in enumerate(labels):
            alone = pipe.sample([lab], cfg=4.0, seed=0, sample_ids=[i])
            d = (alone.tokens[0] != together.tokens[i])
            per.append(int(d.sum()))
            first_diff.append(int(d.nonzero()[0]) if d.any() else None)
            pix = max(pix, int((alone.images[0].int() - together.images[i].int()).abs().max()))
        rec = dict(tokens_differing_total=sum(per), tokens_total=together.tokens.numel(),
                   samples_with_any_difference=sum(1 for p in per if p), tokens_differing_per_sample=per,
                   first_differing_position=first_diff, max_pixel_diff=pix, device=str(ctx.device),
                   engine_mode=_mode(pipe))
        ctx.put(_dt(dt), rec)   # a figure, not a pass/fail: the README's bf16 claim is set from it


# ============================================================================ 10 decode vs sample, FID shards

def decode_and_fid_writer(ctx: Ctx):
    from dar_fast.pipeline import Pipeline
    dt = torch.bfloat16 if ctx.cuda else torch.float32
    tok, ar = build_models(ctx, dt)
    pipe = Pipeline(tok, ar)
    labels = [1, 2, 3, 4]
    out = pipe.sample(labels, cfg=4.0, seed=11)
    img = pipe.decode(out.tokens, seed=11)
    diff = (img.int() - out.images.int()).abs()
    rec = dict(max_pixel_diff=int(diff.max()), fraction_of_pixels_differing=float((diff > 0).float().mean()),
               dtype=_dt(dt))
    ctx.put("decode_vs_sample", rec)
    # the engine's last preview and decode() take the same flow steps on the same noise, so in float32 they
    # differ by float rounding only (1 level measured on the CPU); in bf16 the gap is what this records
    if dt == torch.float32:
        ctx.check(rec["max_pixel_diff"] <= 2, f"decode(tokens) and sample() images differ by up to "
                                              f"{rec['max_pixel_diff']} levels in float32")
    ctx.attempt("fid_shard_writer", _fid_writer, ctx, out.images.shape[1:], out.tokens.shape[1])


def _fid_writer(ctx: Ctx, hw3, N):
    """dar-fast fid's writer (dar_fast.shards.ShardedOutput): shards written, verified, assembled, re-read."""
    import numpy as np

    from dar_fast.shards import ShardedOutput
    d = os.path.join(ctx.out, "tmp_fid_shards")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    B, shards = (64, 8) if ctx.cuda else (16, 4)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (B, *hw3), dtype=np.uint8)           # random: no compression shortcut
    so = ShardedOutput(os.path.join(d, "samples.npz"), dict(check="gpu_check"), num_items=B * shards, shard_size=B,
                       fields={"images": (tuple(hw3), np.uint8), "labels": ((), np.int64)}, log=print)
    t0 = time.perf_counter()
    if so.begin():
        raise RuntimeError("a fresh shard directory reported itself finished")
    for k in so.pending(range(shards)):
        so.write(k, images=images, labels=np.arange(B, dtype=np.int64))
    t_shards = time.perf_counter() - t0
    t0 = time.perf_counter()
    so.finish()
    t_asm = time.perf_counter() - t0
    mb = images.nbytes * shards / 1e6
    ctx.put("fid_shard_writer", dict(images=B * shards, image_shape=list(hw3), shard_images_per_s=B * shards / t_shards,
                                     shard_MBps=mb / t_shards, finish_images_per_s=B * shards / t_asm,
                                     finish_MBps=mb / t_asm, note="finish = verify shards, assemble, re-read"))
    shutil.rmtree(d, ignore_errors=True)


# ============================================================================ 11 training

def training(ctx: Ctx):
    import bench_training as bt

    from _common import bench
    info = ctx.ceilings()
    cases = [("tokenizer", "tokenizer_v1", 32), ("ar", "D-AR-L", 64)] if ctx.cuda else \
        [("tokenizer", "tokenizer-tiny", 2), ("ar", "ar-tiny", 4)]
    rate = info.get("bf16_tflops") if ctx.cuda else None
    for kind, preset, batch in cases:
        def one():
            if ctx.cuda:
                torch.cuda.reset_peak_memory_stats()
            step, flops, units, unit, n_params = bt.build_step(kind, preset, batch, ctx.device, grad_ckpt=True,
                                                               compile_=ctx.cuda)
            t0 = time.perf_counter()
            step()                                               # compile + first step
            ctx.sync()
            first = time.perf_counter() - t0
            if ctx.cuda:
                t = bench(step, ctx.device, rep_ms=300.0)
            else:                                                # one more step: the CPU rehearsal's budget
                t0 = time.perf_counter()
                step()
                t = dict(ms=(time.perf_counter() - t0) * 1e3)
            s = t["ms"] / 1e3
            rec = dict(batch=batch, params=n_params, ms_per_step=t["ms"], first_step_s=first,
                       grad_checkpointing=True, compile=ctx.cuda, fused_adamw=ctx.cuda, bf16_autocast=ctx.cuda,
                       tflops=flops / s / 1e12, **{unit: units / s}, **_peak_mem(ctx))
            if rate:
                rec["mfu_vs_measured_bf16"] = flops / s / (rate * 1e12)
            ctx.put(f"{kind}:{preset}", rec)
            del step
        ctx.attempt(f"{kind}:{preset}", one)
        if ctx.cuda:
            torch.cuda.empty_cache()
            if ctx.time_left() > 25:
                ctx.attempt(f"{kind}:{preset}:max_batch", _max_batch, ctx, bt, kind, preset, batch)
    ctx.attempt("ddp_one_rank", _ddp_one_rank, ctx)


def _max_batch(ctx: Ctx, bt, kind, preset, batch):
    """Largest per-GPU batch (doubling, eager: compile would recompile per shape) whose step fits."""
    fits, b = None, batch
    while ctx.time_left() > 15 and b <= 4096:
        try:
            step = bt.build_step(kind, preset, b, ctx.device, grad_ckpt=True, compile_=False)[0]
            step()
            ctx.sync()
            fits = b
            del step
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
        b *= 2
    ctx.put(f"{kind}:{preset}:max_batch", dict(largest_fitting=fits, tried_up_to=b, grad_checkpointing=True,
                                               note="doubling from the timed batch; eager; bf16 autocast"))


def _ddp_one_rank(ctx: Ctx):
    import socket

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if ctx.cuda else "gloo"
    t0 = time.perf_counter()
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = torch.nn.Linear(64, 64).to(ctx.device)
        ddp = DDP(model, device_ids=[0] if ctx.cuda else None)
        loss = ddp(torch.randn(8, 64, device=ctx.device)).square().mean()
        loss.backward()
        t = torch.ones(1, device=ctx.device)
        dist.all_reduce(t)
        ctx.sync()
        ctx.put("ddp_one_rank", dict(backend=backend, all_reduce=float(t), grad_finite=bool(
            torch.isfinite(model.weight.grad).all()), seconds=time.perf_counter() - t0))
    finally:
        dist.destroy_process_group()


# ============================================================================ 12 trimmed benchmarks

# (option, GPU values, --smoke values, required). The smoke run passes the same option names (the scripts' --smoke
# overrides the sizes), so CI fails here when a benchmark renames an option the GPU run relies on.
_BENCH_ARGS = {
    "bench_sample_tokens": [("--batches", ["1", "64"], ["1", "64"], True)],
    "bench_sampling": [("--presets", ["D-AR-L"], ["D-AR-L"], True), ("--batches", ["1", "64"], ["1", "2"], True),
                       ("--reps", ["1"], ["1"], False), ("--eager-batches", ["1"], ["1"], False)],
}


def benchmarks(ctx: Ctx):
    for name, opts in _BENCH_ARGS.items():
        script = os.path.join(HERE, f"{name}.py")
        out = os.path.join(ctx.out, f"{name}.json")
        cmd = [sys.executable, script, "--out", out] + (["--smoke", "--device", "cpu"] if ctx.smoke else
                                                         ["--device", "cuda"])
        src = open(script).read()
        missing = [o for o, _, _, req in opts if req and f'"{o}"' not in src]
        if not ctx.check(not missing, f"{name}: the script has no {missing} option any more; gpu_check needs it"):
            continue
        for o, gpu, smoke, _ in opts:
            if f'"{o}"' in src:                        # optional ones only where this version has them
                cmd += [o, *(smoke if ctx.smoke else gpu)]
        left = ctx.time_left() - 3
        if left < 10:
            ctx.put(name, "not run: the section's cap was near")
            continue
        t0 = time.time()
        env = dict(os.environ, OMP_NUM_THREADS="1") if ctx.smoke else dict(os.environ)
        try:
            r = run_sub(cmd, timeout=left, env=env)
        except subprocess.TimeoutExpired:
            ctx.check(False, f"{name}: timed out after {left:.0f}s")
            continue
        print(r.stdout[-8000:], r.stderr[-4000:], flush=True)
        ok = r.returncode == 0 and os.path.exists(out)
        ctx.put(name, dict(returncode=r.returncode, seconds=round(time.time() - t0, 1),
                           json=os.path.basename(out) if ok else None, argv=cmd[1:]))
        ctx.check(ok, f"{name} exited {r.returncode}: {(r.stderr.strip().splitlines() or [''])[-1][:200]}")
