"""The context every gpu_check section runs in (benchmarks/gpu_check.py forks one process per section), and the
models they share. `--smoke` gives each section its CPU variant at tiny sizes.

Real sizes on a GPU: tokenizer_v1 and D-AR-L with random weights (timing and token agreement do not depend
on trained values), drawn on the device as tests/helpers.randomize_ draws them on the CPU.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback

import torch

from dar_fast.seeding import key

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for _p in (HERE, os.path.join(REPO, "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)


_CHILD_GROUPS: list = []


def _kill_children(*_):
    """SIGTERM from gpu_check's watchdog: end the subprocesses this section started (their own sessions)."""
    for pg in _CHILD_GROUPS:
        try:
            os.killpg(pg, signal.SIGKILL)
        except OSError:
            pass
    os._exit(124)


def run_sub(cmd, timeout: float, **kw) -> subprocess.CompletedProcess:
    """subprocess.run in its own session, killed with all its children (pytest-xdist workers, compile workers)
    on timeout or when the watchdog stops this section. Raises subprocess.TimeoutExpired on timeout."""
    signal.signal(signal.SIGTERM, _kill_children)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         **kw)
    _CHILD_GROUPS.append(p.pid)
    try:
        out, err = p.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    finally:
        _CHILD_GROUPS.remove(p.pid)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


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
            if not self.smoke and not self.cuda and self.name != "environment":
                # the real sizes on a CPU would take hours and prove nothing the smoke variant does not
                raise Skip("needs CUDA (torch sees no GPU; --smoke runs the CPU variant)")
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
            g = torch.Generator(device=p.device).manual_seed(key(seed, "randomize", i))
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
