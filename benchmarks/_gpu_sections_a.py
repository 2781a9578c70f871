"""gpu_check sections 1-4: environment, pytest -m gpu, kernels at real sizes, engine correctness.
See _gpu_check_ctx.py for the context (Ctx) and the shared models."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import torch

from _gpu_check_ctx import REPO, Ctx, _dt, build_models, run_sub  # noqa: F401


# ============================================================================ 1 environment

def environment(ctx: Ctx):
    import platform
    f = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
             cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
             cuda_available=torch.cuda.is_available(), device_count=torch.cuda.device_count(),
             cpu_threads=torch.get_num_threads(), smoke=ctx.smoke)
    try:
        import triton
        f["triton"] = triton.__version__
    except Exception as e:
        f["triton"] = f"not importable: {e}"
    if torch.cuda.is_available():
        pr = torch.cuda.get_device_properties(0)
        f.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(pr.total_memory / 2**30, 1),
                 compute_capability=f"{pr.major}.{pr.minor}", sm_count=pr.multi_processor_count,
                 l2_cache_mb=round(getattr(pr, "L2_cache_size", 0) / 2**20, 1), arch_list=torch.cuda.get_arch_list(),
                 sdpa_enabled={k: getattr(torch.backends.cuda, f"{k}_sdp_enabled", lambda: None)()
                               for k in ("flash", "mem_efficient", "math", "cudnn")},
                 tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
        f["nvidia_smi"] = r.stdout.strip() or r.stderr.strip()
    except Exception as e:
        f["nvidia_smi"] = f"unavailable: {type(e).__name__}"
    ctx.put("versions", f)
    opt = {}
    for mod in ("flash_attn", "xformers", "nvidia.dali", "torchvision", "scipy"):
        try:
            m = __import__(mod, fromlist=["_"])
            opt[mod] = getattr(m, "__version__", "imported")
        except Exception as e:
            opt[mod] = f"not importable ({type(e).__name__})"
    ctx.put("optional_packages", opt)
    from dar_fast.kernels import sample_tokens as st
    ext = st.extension_status()
    ctx.put("extension", ext)
    from dar_fast import attention
    ctx.put("attention_backend", attention.backend())
    if not ctx.smoke and torch.cuda.is_available():
        ctx.check(ext["built"] and ext["cuda"], f"dar_fast._C is not built with CUDA: {ext}")
    ctx.attempt("measured", _measure_ceilings, ctx)


def _measure_ceilings(ctx: Ctx):
    """Copy bandwidth (read + written) and matmul rate on random data, the ceilings later sections use."""
    dev = ctx.device
    if ctx.cuda:
        nbytes, mm_n, mm_dtype, reps = 2 << 30, 8192, torch.bfloat16, 10     # 2 GiB: 35x the H200's 60 MB L2
    else:
        nbytes, mm_n, mm_dtype, reps = 64 << 20, 384, torch.float32, 3
    src = torch.rand(nbytes // 4, device=dev)
    dst = torch.empty_like(src)
    times = []
    for i in range(reps + 2):
        ctx.sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        ctx.sync()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    copy_gbps = 2 * nbytes / min(times) / 1e9
    del src, dst
    a = torch.randn(mm_n, mm_n, device=dev, dtype=mm_dtype)
    b = torch.randn(mm_n, mm_n, device=dev, dtype=mm_dtype)
    for _ in range(3):
        a @ b
    ctx.sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    ctx.sync()
    tflops = 2 * mm_n ** 3 * reps / (time.perf_counter() - t0) / 1e12
    ctx.put("measured", dict(copy_gbps=round(copy_gbps, 1), copy_bytes=nbytes, matmul_tflops=round(tflops, 3),
                             matmul=f"{mm_n}^3 {_dt(mm_dtype)} random, mean of {reps} after 3 warm-ups",
                             copy="best of %d, bytes read + written" % reps))


# ============================================================================ 2 pytest -m gpu

def pytest_gpu(ctx: Ctx):
    import xml.etree.ElementTree as ET
    xml = os.path.join(ctx.out, "pytest_gpu.xml")
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider",
           f"--junitxml={xml}", os.path.join(REPO, "tests")]
    env = dict(os.environ)
    if ctx.cuda:
        env.update(DAR_FAST_REQUIRE_EXT="1")
        try:
            import xdist  # noqa: F401
            cmd += ["-n", "4"]                     # 4 workers share the one GPU: the GPU tests are small
        except Exception:
            pass
    else:
        env.update(OMP_NUM_THREADS="1")
    t0 = time.time()
    if os.path.exists(xml):
        os.remove(xml)
    r = run_sub(cmd, timeout=ctx.time_left() - 5, cwd=REPO, env=env)
    print(r.stdout[-20000:], r.stderr[-5000:], flush=True)
    root = ET.parse(xml).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    skip_reasons: dict = {}
    for case in root.iter("testcase"):
        for child in case:
            tag = child.tag
            name = f"{case.get('classname')}::{case.get('name')}"
            if tag in ("failure", "error"):
                failed.append(f"{name}: {(child.get('message') or '').splitlines()[0][:200] if child.get('message') else ''}")
            elif tag == "skipped":
                why = (child.get("message") or "")[:120]
                skip_reasons[why] = skip_reasons.get(why, 0) + 1
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    ctx.put("counts", dict(collected=n["tests"], passed=passed, failed=n["failures"], errors=n["errors"],
                           skipped=n["skipped"], returncode=r.returncode, seconds=round(time.time() - t0, 1),
                           parallel="-n 4" if "-n" in cmd else "serial"))
    ctx.put("skip_reasons", skip_reasons)
    if failed:
        ctx.put("failed_tests", failed[:40])
    ctx.check(n["failures"] + n["errors"] == 0, f"{n['failures']} failed, {n['errors']} errors in pytest -m gpu")
    ctx.check(n["tests"] > 0, "pytest -m gpu collected no test")
    if ctx.cuda:
        ctx.check(passed > 0, "no GPU test passed")
    else:   # the CPU rehearsal: every GPU test must skip, none may pass by accident on the CPU
        ctx.check(passed == 0, f"{passed} gpu-marked tests passed without CUDA")


# ============================================================================ 3 kernels

def kernels(ctx: Ctx):
    from _common import bench, rates
    from dar_fast.kernels.backend import triton_available
    if ctx.smoke:
        if not triton_available():
            ctx.put("triton", "not installed: the Triton kernels are not checked, only the sampler")
        else:
            os.environ.update(TRITON_INTERPRET="1", DAR_FAST_BACKEND="triton")   # kernels interpreted on the CPU
    info = ctx.ceilings()
    ctx.put("ceiling", dict(mem_bw_gbs=info.get("mem_bw_gbs"), source=info.get("ceiling_source")))
    rep = dict(rep_ms=50.0) if ctx.cuda else dict(rep_ms=1.0, max_iters=1)
    have_triton = triton_available() and (ctx.cuda or os.environ.get("TRITON_INTERPRET") == "1")

    def timed(key, fn, nbytes, **extra):
        t = bench(fn, ctx.device, **rep)
        return dict(ms=t["ms"], method=t["method"], **rates(t["ms"], info, nbytes=nbytes), **extra)

    if have_triton:
        ctx.attempt("vq_nearest", _k_vq, ctx, timed)
        ctx.attempt("rope", _k_rope, ctx, timed)
        ctx.attempt("flow_step", _k_flow, ctx, timed)
        for name, make in _EXTRA_KERNELS.items():
            ctx.attempt(name, _k_generic, ctx, timed, name, make)
    ctx.attempt("sample_tokens", _k_sampler, ctx, timed)


def _rand(ctx, *shape, dt):
    return torch.randn(*shape, device=ctx.device).to(dt)


# The fused kernels (RMSNorm, SwiGLU, adaLN, decode attention), each (op, reference, inputs) at a D-AR-L / tokenizer_v1 size on
# a GPU (rows = 2 x 64 CFG rows for decode, 64 x 256 tokens for training/DiT), tiny under --smoke.
_EXTRA_KERNELS = {
    "rms_norm": lambda ctx, dt: ("rms_norm", "rms_norm_ref",
                                 (_rand(ctx, *((64 * 256, 1024) if ctx.cuda else (37, 48)), dt=dt),
                                  1 + 0.1 * _rand(ctx, 1024 if ctx.cuda else 48, dt=dt))),
    "swiglu": lambda ctx, dt: ("swiglu", "swiglu_ref", (_rand(ctx, *((64 * 256, 2 * 2816) if ctx.cuda else (37, 2 * 24)), dt=dt),)),
    "adaln_modulate": lambda ctx, dt: ("adaln_modulate", "adaln_modulate_ref",
                                       (_rand(ctx, *((64, 1024, 768) if ctx.cuda else (2, 9, 40)), dt=dt),
                                        _rand(ctx, *((64, 1, 768) if ctx.cuda else (2, 1, 40)), dt=dt),
                                        _rand(ctx, *((64, 1, 768) if ctx.cuda else (2, 1, 40)), dt=dt))),
    "decode_attention": lambda ctx, dt: ("decode_attention", "decode_attention_ref",
                                         (_rand(ctx, *((128, 16, 64) if ctx.cuda else (3, 4, 16)), dt=dt),
                                          _rand(ctx, *((128, 16, 257, 64) if ctx.cuda else (3, 2, 19, 16)), dt=dt),
                                          _rand(ctx, *((128, 16, 257, 64) if ctx.cuda else (3, 2, 19, 16)), dt=dt),
                                          torch.tensor([200 if ctx.cuda else 11], device=ctx.device))),
}


def _k_generic(ctx, timed, name, make):
    """One newer kernel against its reference: relative max error, ms, GB/s of inputs read + output written."""
    import importlib
    from dar_fast import ops
    dt = torch.bfloat16 if ctx.cuda else torch.float32
    op_name, ref_name, args = make(ctx, dt)
    module = {"adaln_modulate": "adaln"}.get(name, name)
    op, ref = getattr(ops, op_name), getattr(importlib.import_module(f"dar_fast.kernels.{module}"), ref_name)
    got, want = op(*args), ref(*args)
    got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
    err = max(float((g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-30))
              for g, w in zip(got, want))
    nbytes = sum(a.numel() * a.element_size() for a in args if torch.is_tensor(a) and a.numel() > 1) + \
        sum(g.numel() * g.element_size() for g in got)
    rec = timed(name, lambda: op(*args), nbytes=nbytes, dtype=_dt(dt), rel_max_err=err,
                shapes=[list(a.shape) for a in args if torch.is_tensor(a)])
    ctx.put(name, rec)
    # bf16 outputs round once (2^-8 relative); float32 differ in summation order only
    ctx.check(err <= (2e-2 if dt == torch.bfloat16 else 1e-4), f"{name}: relative max error {err:.3g} vs the reference")


def _k_vq(ctx, timed):
    from dar_fast import ops
    from dar_fast.kernels.vq_nearest import vq_nearest_ref
    M, n, d = (65536, 16384, 8) if ctx.cuda else (37, 101, 8)
    z = torch.randn(M, d, device=ctx.device)
    cb = torch.randn(n, d, device=ctx.device)
    got, want = ops.vq_nearest(z, cb), vq_nearest_ref(z, cb)
    mism = int((got != want).sum())
    rec = timed("vq_nearest", lambda: ops.vq_nearest(z, cb), nbytes=M * d * 4 + n * d * 4 + M * 8,
                M=M, n=n, d=d, mismatches=mism)
    rec["ref_ms"] = timed("ref", lambda: vq_nearest_ref(z, cb), nbytes=None)["ms"]
    ctx.put("vq_nearest", rec)
    # a near-tie (two cosines within fp32 rounding) may pick the other code; more than 1 in 10^4 is a bug
    ctx.check(mism <= max(1, M // 10000), f"vq_nearest: {mism} of {M} rows differ from the reference")


def _k_rope(ctx, timed):
    from dar_fast import ops
    from dar_fast.kernels.rope import apply_rope_ref
    cases = ([("decode", 128, 1, 16, 64, 1, torch.bfloat16), ("dit_2d", 64, 1024, 12, 64, 2, torch.bfloat16)]
             if ctx.cuda else [("decode", 6, 1, 3, 16, 1, torch.float32), ("dit_2d", 1, 9, 2, 16, 2, torch.float32)])
    out = {}
    for name, B, T, H, D, P, dt in cases:
        q = torch.randn(B, T, H, D, device=ctx.device, dtype=dt)
        k = torch.randn(B, T, H, D, device=ctx.device, dtype=dt)
        pos = torch.randint(0, 64, (T, P), device=ctx.device)
        (gq, gk), (rq, rk) = ops.apply_rope(q, k, pos), apply_rope_ref(q, k, pos)
        err = max(float((gq.float() - rq.float()).abs().max()), float((gk.float() - rk.float()).abs().max()))
        out[name] = timed(name, lambda: ops.apply_rope(q, k, pos), nbytes=4 * q.numel() * q.element_size(),
                          shape=[B, T, H, D], P=P, dtype=_dt(dt), max_abs_err=err)
        tol = 1e-5 if dt == torch.float32 else 2e-2
        ctx.check(err <= tol * 8, f"rope {name}: max abs error {err:.3g} vs the reference")
    ctx.put("rope", out)


def _k_flow(ctx, timed):
    from dar_fast import ops
    from dar_fast.kernels.flow_step import flow_step_ref
    B, H = (64, 256) if ctx.cuda else (2, 11)
    x, v, vp = (torch.randn(B, 3, H, H, device=ctx.device) for _ in range(3))
    got, want = ops.flow_step(x, v, vp, 0.3, 0.45), flow_step_ref(x, v, vp, 0.3, 0.45)
    err = float((got - want).abs().max())
    rec = timed("flow_step", lambda: ops.flow_step(x, v, vp, 0.3, 0.45), nbytes=4 * x.numel() * 4,
                shape=list(x.shape), max_abs_err=err)
    ctx.put("flow_step", rec)
    ctx.check(err <= 1e-5, f"flow_step: max abs error {err:.3g} vs the reference")


def _k_sampler(ctx, timed):
    from dar_fast.kernels import sample_tokens as st
    V, B = (16384, 64) if ctx.cuda else (4096, 8)
    dt = torch.bfloat16 if ctx.cuda else torch.float32
    out = {}
    for fname, fkw in (("plain", {}), ("top_k100_top_p0.9", dict(top_k=100, top_p=0.9))):
        c = (3 * torch.randn(B, V, device=ctx.device)).to(dt)
        u = (3 * torch.randn(B, V, device=ctx.device)).to(dt)
        keys = dict(seeds=torch.arange(B, device=ctx.device), sample_ids=torch.arange(B, device=ctx.device),
                    positions=torch.full((B,), 17, dtype=torch.int64, device=ctx.device))
        got = st.sample_tokens(c, u, 4.0, **fkw, **keys)
        want = st.sample_tokens_ref(c, u, 4.0, **fkw, **keys)
        diff = int((got.cpu() != want.cpu()).sum())
        out[fname] = timed(fname, lambda: st.sample_tokens(c, u, 4.0, **fkw, **keys), nbytes=2 * B * V * c.element_size(),
                           B=B, V=V, dtype=_dt(dt), tokens_differing=diff, extension=st.extension_status()["built"])
        ctx.check(diff == 0, f"sample_tokens {fname}: {diff} of {B} tokens differ from the reference")
    ctx.put("sample_tokens", out)


# ============================================================================ 4 engine correctness

def _engines(ctx: Ctx, tok, ar) -> dict:
    """{name: Pipeline} for every engine mode this tree has: eager, and on CUDA graphs and compiled."""
    import inspect

    from dar_fast.pipeline import Pipeline
    params = inspect.signature(Pipeline.__init__).parameters
    if "compile" in params:                        # the engine with eager | compiled | captured modes
        out = {"eager": Pipeline(tok, ar, use_cuda_graphs=False, compile=False)}
        if ctx.cuda:
            out["captured"] = Pipeline(tok, ar, use_cuda_graphs=True)
            out["compiled"] = Pipeline(tok, ar, use_cuda_graphs=False, compile=True)
    else:
        out = {"eager": Pipeline(tok, ar, use_cuda_graphs=False)}
        if ctx.cuda:
            out["captured"] = Pipeline(tok, ar, use_cuda_graphs=True)
    return out


def _engine_status(pipe):
    try:
        from dar_fast import engine
        return engine.status(pipe)
    except Exception as e:
        return f"unavailable ({type(e).__name__})"


def engine_correctness(ctx: Ctx):
    """Tokens of every engine mode against eager, and eager against the reference sampler. Order: what matters
    most first (bf16 then float32 eager + captured, the GPU default), compiled last, each part only while the
    section's cap allows (compiling a mode costs tens of seconds)."""
    dtypes = [torch.bfloat16, torch.float32] if ctx.cuda else [torch.float32]
    cases = {"cfg_constant": dict(cfg=4.0), "cfg_schedule": dict(cfg=(1.1, 8.0)),
             "top_k_top_p": dict(cfg=4.0, top_k=100, top_p=0.9), "prefix": dict(cfg=4.0)}
    labels = torch.tensor([3, 1, 4, 1])
    setups = {}
    for dt in dtypes:
        tok, ar = build_models(ctx, dt)
        prefix = torch.randint(0, tok.codebook_size, (4, 32 if ctx.cuda else 4))
        engines = _engines(ctx, tok, ar)
        setups[dt] = (tok, ar, prefix, engines, {})
        ctx.attempt(f"{_dt(dt)}:eager", _eager_vs_reference, ctx, dt, setups[dt], cases, labels)
        if ctx.cuda:
            ctx.attempt(f"{_dt(dt)}:captured", _mode_vs_eager, ctx, dt, setups[dt], cases, labels, "captured")
        else:
            ctx.put("captured_and_compiled", "needs CUDA (compiling on a CPU costs tens of seconds)")
    for dt in dtypes:
        if "compiled" in setups[dt][3]:
            ctx.attempt(f"{_dt(dt)}:compiled", _mode_vs_eager, ctx, dt, setups[dt], cases, labels, "compiled")
    for dt in dtypes:                          # a mode that fell back to eager would pass vacuously
        for ename, pipe in setups[dt][3].items():
            st = _engine_status(pipe)
            ctx.put(f"{_dt(dt)}:status_{ename}", st)
            if isinstance(st, dict) and ename != "eager":
                ctx.check(not st.get("fallbacks"), f"{_dt(dt)} {ename}: fell back: {st.get('fallbacks')}")
    setups.clear()
    if ctx.cuda:
        torch.cuda.empty_cache()
        if ctx.time_left() > 5:
            ctx.attempt("float32_cpu_vs_gpu", _cpu_vs_gpu, ctx)
        else:
            ctx.put("float32_cpu_vs_gpu", "not run: the section's cap was near")
    else:
        ctx.put("float32_cpu_vs_gpu", "needs CUDA")


def _eager_vs_reference(ctx, dt, setup, cases, labels):
    from dar_fast.sampler import reference_sample
    tok, ar, prefix, engines, base = setup
    res = {}
    for cname, kw in cases.items():
        pre = prefix if cname == "prefix" else None
        base[cname] = engines["eager"].sample(labels, seed=7, prefix_tokens=pre, **kw)
        ref = reference_sample(tok, ar, labels, seed=7, prefix_tokens=pre, **kw)
        d = int((base[cname].tokens != ref.tokens).sum())
        res[cname] = dict(tokens_differing=d, max_pixel_diff=int((base[cname].images.int() - ref.images.int()).abs().max()))
        if dt == torch.float32:    # bf16 eager and the reference may round differently; recorded, not judged
            ctx.check(d == 0, f"float32 {cname}: eager engine and reference sampler differ in {d} tokens")
        ctx.put(f"{_dt(dt)}:eager_vs_reference", res)


def _mode_vs_eager(ctx, dt, setup, cases, labels, mode):
    tok, ar, prefix, engines, base = setup
    pipe, res = engines[mode], {}
    for cname, kw in cases.items():
        if ctx.time_left() < 8 or cname not in base:
            res[cname] = "not run: the section's cap was near" if cname in base else "no eager baseline"
            continue
        pre = prefix if cname == "prefix" else None
        got = pipe.sample(labels, seed=7, prefix_tokens=pre, **kw)
        d = int((got.tokens != base[cname].tokens).sum())
        res[cname] = dict(tokens_differing=d, max_pixel_diff=int((got.images.int() - base[cname].images.int()).abs().max()))
        ctx.check(d == 0, f"{_dt(dt)} {cname}: {mode} and eager differ in {d} tokens")
        ctx.put(f"{_dt(dt)}:{mode}_vs_eager", res)
    if ctx.time_left() > 8:     # a batch-size change must re-capture / re-specialise, not replay a stale graph
        small = torch.tensor([2, 7])
        d = int((pipe.sample(small, seed=9, cfg=4.0).tokens != engines["eager"].sample(small, seed=9, cfg=4.0).tokens).sum())
        res["batch_change_4_to_2"] = dict(tokens_differing=d)
        ctx.check(d == 0, f"{_dt(dt)}: after a batch-size change {mode} and eager differ in {d} tokens")
    ctx.put(f"{_dt(dt)}:{mode}_vs_eager", res)


def _cpu_vs_gpu(ctx: Ctx):
    from dar_fast.pipeline import Pipeline
    from helpers import tiny_ar, tiny_tokenizer
    tok = tiny_tokenizer(seed=1)
    ar = tiny_ar(seed=2, vocab_size=tok.codebook_size, block_size=tok.num_tokens)
    labels = torch.tensor([0, 1, 2, 3, 4])
    cpu = Pipeline(tok, ar).sample(labels, seed=3, cfg=4.0)
    gpu = Pipeline(tok.to("cuda"), ar.to("cuda")).sample(labels, seed=3, cfg=4.0)
    d = int((cpu.tokens != gpu.tokens).sum())
    ctx.put("float32_cpu_vs_gpu", dict(tokens_differing=d, tokens=cpu.tokens.numel(),
                                       max_pixel_diff=int((cpu.images.int() - gpu.images.int()).abs().max())))
    ctx.check(d == 0, f"float32 CPU vs GPU: {d} tokens differ on the tiny config")
