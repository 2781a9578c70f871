"""gpu_check sections 1-6 (environment, pytest -m gpu, kernels, engine correctness, attention kernels,
decode step) and the context every section runs in. Driven by benchmarks/gpu_check.py, one forked process
per section; `--smoke` gives each its CPU variant at tiny sizes.

Real sizes on a GPU: tokenizer_v1 and D-AR-L with random weights (timing and token agreement do not depend
on trained values), drawn on the device as tests/helpers.randomize_ draws them on the CPU.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for _p in (HERE, os.path.join(REPO, "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)


class Skip(Exception):
    """The whole section cannot run here; the message is the reason."""


class Ctx:
    """One section's run: device, sizes, the figures saved so far (rewritten atomically after each put)."""

    def __init__(self, name: str, out: str, smoke: bool, deadline: float):
        self.name, self.out, self.smoke, self.deadline = name, out, smoke, deadline
        self.path = os.path.join(out, "sections", f"{name}.json")
        self.figures: dict = {}
        self.errors: list = []
        self.cuda = torch.cuda.is_available() and not smoke
        self.device = torch.device("cuda" if self.cuda else "cpu")
        if smoke:
            torch.set_num_threads(1)     # tiny models: one thread is as fast, and immune to a busy machine

    # ------------------------------------------------------------------ records
    def time_left(self) -> float:
        return self.deadline - time.time()

    def save(self, status: str = "running", **extra) -> None:
        from dar_fast.io import write_json_atomic
        write_json_atomic(self.path, dict(status=status, figures=self.figures, **extra))

    def put(self, key: str, value) -> None:
        self.figures[key] = value
        print(f"[{self.name}] {key}: {json.dumps(value, default=str)[:400]}", flush=True)
        self.save()

    def check(self, ok: bool, msg: str) -> bool:
        if not ok:
            self.errors.append(msg)
            print(f"[{self.name}] CHECK FAILED: {msg}", flush=True)
            self.save()
        return ok

    def attempt(self, key: str, fn, *a, **kw):
        """Run one part; a failure is recorded under `key` and in the errors, and the section goes on."""
        try:
            return fn(*a, **kw)
        except Exception as e:
            traceback.print_exc()
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
            self.figures[key] = {"error": msg}
            self.check(False, f"{key}: {msg}")
            return None

    def run(self, fn) -> int:
        self.save()
        try:
            fn(self)
        except Skip as e:
            self.save("skipped", reason=str(e))
            return 3
        except Exception as e:
            traceback.print_exc()
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self.errors.append(f"{type(e).__name__}: {first}"[:400])
        if self.errors:
            self.save("failed", error="; ".join(self.errors)[:2000])
            return 1
        self.save("ok")
        return 0

    # ------------------------------------------------------------------ shared inputs
    def need_cuda(self) -> None:
        if not self.cuda:
            raise Skip("needs CUDA" + ("" if self.smoke else " (torch sees no GPU; --smoke runs the CPU variant)"))

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def ceilings(self) -> dict:
        """Copy GB/s and bf16 TFLOP/s measured by the environment section, else _common's table / copy."""
        env = {}
        try:
            env = json.load(open(os.path.join(self.out, "sections", "environment.json")))["figures"]
        except Exception:
            pass
        from _common import device_info
        info = dict(device_info(self.device))
        m = env.get("measured", {})
        if m.get("copy_gbps"):
            info["mem_bw_gbs"] = m["copy_gbps"]
            info["ceiling_source"] = "measured by gpu_check environment"
        if m.get("matmul_tflops") and self.cuda:
            info["bf16_tflops"] = m["matmul_tflops"]
        info.setdefault("bf16_tflops", info.get("bf16_tflops_measured"))
        return info


def randomize(model: torch.nn.Module, scale: float = 0.02, seed: int = 0) -> torch.nn.Module:
    """tests/helpers.randomize_'s rule (norm weights 1 + 0.1 N(0,1), the rest scale * N(0,1)), drawn on the
    model's device: a 1.5 GB model would spend seconds in CPU randn and the copy."""
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            g = torch.Generator(device=p.device).manual_seed(seed * 100003 + i)
            r = torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32)
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight")) or "_norm.weight" in name:
                p.copy_(1 + 0.1 * r)
            else:
                p.copy_(scale * r)
    return model


def build_models(ctx: Ctx, dtype, preset: str = "D-AR-L", device=None):
    """(tokenizer, ar): tokenizer_v1 + `preset` on the GPU; the tests' tiny pair with --smoke."""
    from dar_fast.config import ar_config, tokenizer_config
    from dar_fast.models import ARModel, Tokenizer
    device = device or ctx.device
    if ctx.smoke:
        from helpers import tiny_ar, tiny_tokenizer
        tok = tiny_tokenizer(seed=1)
        ar = tiny_ar(seed=2, vocab_size=tok.codebook_size, block_size=tok.num_tokens)
        return tok.to(device, dtype).eval(), ar.to(device, dtype).eval()
    tcfg = tokenizer_config("tokenizer_v1")
    tcfg.repa_head = False
    with torch.device(device):
        tok = randomize(Tokenizer(tcfg), seed=1)
        ar = randomize(ARModel(ar_config(preset)), seed=2)
    return tok.to(dtype).eval(), ar.to(dtype).eval()


def _dt(d) -> str:
    return str(d).replace("torch.", "")


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
                 arch_list=torch.cuda.get_arch_list())
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
    r = subprocess.run(cmd, cwd=REPO, env=env, timeout=max(5.0, ctx.time_left() - 5), capture_output=True,
                       text=True)
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
    ctx.attempt("sample_tokens", _k_sampler, ctx, timed)


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
    from dar_fast.sampler import reference_sample
    dtypes = [torch.bfloat16, torch.float32] if ctx.cuda else [torch.float32]
    cases = {"cfg_constant": dict(cfg=4.0), "cfg_schedule": dict(cfg=(1.1, 8.0)),
             "top_k_top_p": dict(cfg=4.0, top_k=100, top_p=0.9), "prefix": dict(cfg=4.0)}
    for dt in dtypes:
        tok, ar = build_models(ctx, dt)
        labels = torch.tensor([3, 1, 4, 1])
        prefix = torch.randint(0, tok.codebook_size, (4, 32 if ctx.cuda else 4))
        engines = _engines(ctx, tok, ar)
        eager = engines.pop("eager")
        res = {} if ctx.cuda else {"captured_and_compiled": "needs CUDA (compiling on a CPU costs tens of seconds)"}
        for cname, kw in cases.items():
            if ctx.time_left() < 10:
                res[cname] = "not run: the section's cap was near"
                continue
            pre = prefix if cname == "prefix" else None
            base = eager.sample(labels, seed=7, prefix_tokens=pre, **kw)
            ref = reference_sample(tok, ar, labels, seed=7, prefix_tokens=pre, **kw)
            row = {"eager_vs_reference_tokens_differing": int((base.tokens != ref.tokens).sum())}
            if dt == torch.float32:
                ctx.check(row["eager_vs_reference_tokens_differing"] == 0,
                          f"float32 {cname}: eager engine and reference sampler tokens differ")
            for ename, pipe in engines.items():
                got = pipe.sample(labels, seed=7, prefix_tokens=pre, **kw)
                d = int((got.tokens != base.tokens).sum())
                row[f"{ename}_vs_eager_tokens_differing"] = d
                row[f"{ename}_vs_eager_max_pixel_diff"] = int((got.images.int() - base.images.int()).abs().max())
                ctx.check(d == 0, f"{_dt(dt)} {cname}: {ename} and eager differ in {d} tokens")
            res[cname] = row
            ctx.put(_dt(dt), res)
        if ctx.cuda and ctx.time_left() > 10:    # a batch-size change must re-capture, not replay a stale graph
            small = torch.tensor([2, 7])
            e2 = eager.sample(small, seed=9, cfg=4.0)
            for ename, pipe in engines.items():
                d = int((pipe.sample(small, seed=9, cfg=4.0).tokens != e2.tokens).sum())
                res[f"batch_change_4_to_2_{ename}_tokens_differing"] = d
                ctx.check(d == 0, f"{_dt(dt)}: after a batch-size change {ename} and eager differ in {d} tokens")
        for ename, pipe in engines.items():     # a mode that fell back to eager would pass vacuously
            st = _engine_status(pipe)
            res[f"status_{ename}"] = st
            if isinstance(st, dict):
                ctx.check(not st.get("fallbacks"), f"{_dt(dt)} {ename}: fell back: {st.get('fallbacks')}")
        ctx.put(_dt(dt), res)
        del tok, ar, engines, eager
        if ctx.cuda:
            torch.cuda.empty_cache()
    if ctx.cuda and ctx.time_left() > 5:
        ctx.attempt("float32_cpu_vs_gpu", _cpu_vs_gpu, ctx)
    else:
        ctx.put("float32_cpu_vs_gpu", "needs CUDA" if not ctx.cuda else "not run: the section's cap was near")


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
    from torch.profiler import ProfilerActivity, profile

    from _common import bench
    from dar_fast import ops
    from dar_fast.perf import ar_matmul_params, ar_weight_bytes
    dt = torch.bfloat16 if ctx.cuda else torch.float32
    _, ar = build_models(ctx, dt, preset=preset if ctx.cuda else "D-AR-L")
    info = ctx.ceilings()
    bw = info["mem_bw_gbs"]
    rate = (info.get("bf16_tflops") or 0) if ctx.cuda else None
    res = {}
    for B in batches:
        rows = 2 * B
        ar.setup_cache(rows)
        labels = torch.arange(B, device=ctx.device) % ar.num_classes
        logits = ar.prefill(torch.cat([labels, torch.full_like(labels, ar.null_class)])).float()
        seeds = torch.zeros(B, dtype=torch.int64, device=ctx.device)
        ids = torch.arange(B, device=ctx.device)
        pos = torch.full((1,), ar.num_tokens // 2, dtype=torch.int64, device=ctx.device)
        buf = logits.clone()

        def step():   # the engine's step: CFG + keyed sample, then one AR token for [cond; null]
            t = ops.sample_tokens(buf[:B], buf[B:], cfg_scale=4.0, seeds=seeds, sample_ids=ids,
                                  positions=pos.expand(B))
            buf.copy_(ar.decode_one(torch.cat([t, t]), pos + 1))

        with torch.no_grad():
            step()
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
            with profile(activities=acts) as prof:
                step()
                ctx.sync()
            if ctx.cuda:
                kernels = sum(1 for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA"))
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    step()
                    step()
                torch.cuda.current_stream().wait_stream(s)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    step()
                t = bench(g.replay, ctx.device, rep_ms=100.0)
                eager = bench(step, ctx.device, rep_ms=50.0)
            else:
                kernels = sum(1 for e in prof.events() if e.name.startswith("aten::"))
                t = eager = bench(step, ctx.device, rep_ms=20.0, max_iters=5)
        weight_ms = ar_weight_bytes(ar.cfg, 2 if ctx.cuda else 4) / (bw * 1e9) * 1e3
        flop_ms = 2 * ar_matmul_params(ar.cfg) * rows / (rate * 1e12) * 1e3 if rate else 0.0
        floor = max(weight_ms, flop_ms)
        res[f"batch{B}"] = dict(ms_per_step=t["ms"], eager_ms_per_step=eager["ms"], method=t["method"],
                                kernels_per_step=kernels if ctx.cuda else None,
                                aten_ops_per_step=None if ctx.cuda else kernels,
                                floor_ms=floor, weight_read_floor_ms=weight_ms, flop_floor_ms=flop_ms,
                                multiple_of_floor=t["ms"] / floor if floor else None,
                                replay="cuda graph" if ctx.cuda else "eager (CPU: no graphs)")
        ctx.put(preset, res)
