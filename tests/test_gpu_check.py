"""benchmarks/gpu_check.py: the GPU hour's one command, rehearsed on the CPU.

The full --smoke run (every section's CPU variant, ~2 minutes on 2 cores) is marked slow; CI runs it
(`python -m pytest -q -m slow tests/test_gpu_check.py`). The default suite checks the driver itself:
the budget rule, the per-section watchdog, failures that never stop the run, bad arguments.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
from gpu_check import NAMES, SECTIONS  # noqa: E402


def run(*args, env=None, timeout=400):
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    r = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=e,
                       timeout=timeout, cwd=ROOT)
    return r


def load(out):
    return json.loads((Path(out) / "gpu_check.json").read_text())


def test_sections_are_the_issue_list():
    assert NAMES == ["environment", "pytest_gpu", "kernels", "engine_correctness", "attention_kernels",
                     "decode_step", "engine_end_to_end", "tokenizer_step", "batch_invariance",
                     "decode_and_fid_writer", "training", "benchmarks"]
    assert sum(g for _, g, _ in SECTIONS) <= 480          # the default budget covers every GPU cap


def test_budget_skips_instead_of_overrunning(tmp_path):
    r = run("--smoke", "--out", tmp_path, "--budget-s", "5", "--sections", "environment,kernels")
    assert r.returncode == 0, r.stderr
    rep = load(tmp_path)
    assert list(rep["sections"]) == NAMES
    for name, rec in rep["sections"].items():
        assert rec["status"] == "skipped" and rec["seconds"] == 0.0
        want = "would overrun the budget" if name in ("environment", "kernels") else "not selected"
        assert want in rec["reason"], (name, rec)
    assert rep["summary"] == {"ok": 0, "failed": 0, "skipped": len(NAMES)}
    assert not (tmp_path / "sections").exists()            # per-section records are folded into the JSON


def test_hang_crash_and_error_are_recorded_and_the_run_goes_on(tmp_path):
    fault = "environment:raise,attention_kernels:hang,decode_step:exit"
    r = run("--smoke", "--out", tmp_path, "--sections", "environment,attention_kernels,decode_step,tokenizer_step",
            "--cap", "attention_kernels=4", env={"DAR_FAST_GPU_CHECK_FAULT": fault}, timeout=200)
    assert r.returncode == 1, r.stdout + r.stderr          # failures make the exit status, never stop the run
    s = load(tmp_path)["sections"]
    assert s["environment"]["status"] == "failed" and "injected fault" in s["environment"]["error"]
    assert s["environment"]["figures"] == {"before_the_fault": 1}      # figures saved before a failure are kept
    assert s["attention_kernels"]["status"] == "failed" and "timed out" in s["attention_kernels"]["error"]
    assert 4 <= s["attention_kernels"]["seconds"] < 15
    assert s["decode_step"]["status"] == "failed" and "died" in s["decode_step"]["error"]
    assert s["tokenizer_step"]["status"] == "ok" and s["tokenizer_step"]["figures"]["batch1"]["device_ms"] > 0
    log = (tmp_path / "gpu_check.log").read_text()
    assert "RuntimeError: injected fault" in log and "===== tokenizer_step" in log


def test_bad_arguments_one_line_and_no_overwrite(tmp_path):
    r = run("--smoke", "--out", tmp_path, "--sections", "kernels,nonsense")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "nonsense" in r.stderr
    r = run("--smoke", "--out", tmp_path, "--cap", "training=-1")
    assert r.returncode == 2 and "--cap" in r.stderr
    (tmp_path / "gpu_check.json").write_text("{}")
    r = run("--smoke", "--out", tmp_path, "--sections", "environment")
    assert r.returncode == 2 and "exists" in r.stderr and (tmp_path / "gpu_check.json").read_text() == "{}"


def test_shell_wrapper_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")]).returncode == 0


@pytest.mark.slow
def test_smoke_every_section_runs_or_is_skipped_with_a_reason(tmp_path):
    r = run("--smoke", "--out", tmp_path, timeout=600)
    rep = load(tmp_path)
    s = rep["sections"]
    assert list(s) == NAMES
    bad = {n: rec.get("error") for n, rec in s.items() if rec["status"] not in ("ok", "skipped")}
    assert not bad, bad
    assert all(rec["reason"] for rec in s.values() if rec["status"] == "skipped")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert rep["elapsed_s"] < 180, rep["elapsed_s"]                 # the CI rehearsal's bound, 2 cores
    f = {n: rec["figures"] for n, rec in s.items()}
    assert f["environment"]["measured"]["copy_gbps"] > 0
    c = f["pytest_gpu"]["counts"]
    assert c["collected"] > 0 and c["passed"] == 0 and c["skipped"] == c["collected"]   # no GPU test runs on a CPU
    assert f["kernels"]["sample_tokens"]["plain"]["tokens_differing"] == 0
    eager = f["engine_correctness"]["float32:eager_vs_reference"]
    assert set(eager) == {"cfg_constant", "cfg_schedule", "top_k_top_p", "prefix"}
    assert all(v["tokens_differing"] == 0 for v in eager.values())
    assert f["decode_step"]["tiny"]["batch1"]["ms_per_step"] > 0
    assert f["batch_invariance"]["bfloat16"]["tokens_total"] == 64
    assert f["decode_and_fid_writer"]["fid_shard_writer"]["images"] == 64
    assert (tmp_path / "bench_sample_tokens.json").exists() and (tmp_path / "bench_sampling.json").exists()


@pytest.mark.slow
def test_shell_wrapper_without_a_gpu_rehearses_without_installing(tmp_path):
    # with no CUDA device the wrapper must not reinstall this working environment: it runs --smoke instead
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the wrapper would reinstall the project")
    env = dict(os.environ, OUT=str(tmp_path), OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--sections", "environment"],
                       capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert "torch sees no CUDA device" in r.stdout and r.returncode == 0, r.stdout + r.stderr
    assert "installing" not in r.stdout and not (tmp_path / "gpu_check" / "install.log").exists()
    rep = load(tmp_path / "gpu_check")
    assert rep["smoke"] is True and rep["sections"]["environment"]["status"] == "ok"
    assert f"results in {tmp_path}/gpu_check/gpu_check.json" in r.stdout


def test_without_cuda_and_without_smoke_every_gpu_section_is_skipped(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the sections would run for real")
    r = run("--out", tmp_path, "--sections", "tokenizer_step,batch_invariance", timeout=120)
    s = load(tmp_path)["sections"]
    assert r.returncode == 0, r.stderr
    assert all(s[n]["status"] == "skipped" and "needs CUDA" in s[n]["reason"] for n in ("tokenizer_step",
                                                                                       "batch_invariance"))
