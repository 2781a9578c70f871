"""The sampling and FID-projection benchmarks run end to end (tiny CPU smoke) and report every figure."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script, out):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--device", "cpu", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(Path(out).read_text())


def test_bench_sampling_smoke(tmp_path):
    res = _run("bench_sampling.py", tmp_path / "s.json")
    assert {"device", "torch", "date"} <= set(res["meta"])
    # what ran is recorded: a silent fallback must be visible
    assert res["dtype"] == "float32" and res["threads"] >= 1 and len(res["loadavg"]) == 3
    assert "built" in res["sampler_extension"] and res["engine_modes"] == ["eager"]
    rows = res["results"]
    eng = [r for r in rows if r["impl"] == "engine-eager"]
    assert {r["batch"] for r in eng} == {1, 4}
    for r in eng:
        assert r["tokens_identical_to_reference"] is True
        assert r["modes_run"] == ["eager"] and r["fallbacks"] == [] and r["compiled"] is False
        assert len(r["ratio_vs_reference_per_rep"]) == len(r["ms_reps"]) == 2
        assert r["ms_per_decode_step"] > 0 and r["ar_ms"] > 0 and r["tokenizer_ms"] > 0
    assert {r["impl"] for r in rows} >= {"reference", "released", "kernels-reference", "kernels-engine-eager"}
    ref_k = next(r for r in rows if r["impl"] == "kernels-reference" and r["batch"] == 1)
    eng_k = next(r for r in rows if r["impl"] == "kernels-engine-eager" and r["batch"] == 1)
    for r in (ref_k, eng_k):
        assert r["decode_kernels_per_step"] > 0 and r["tokenizer_step_kernels"] > 0
    # the engine's decode step issues fewer kernels than the reference's (no mask, RoPE table, no per-op checks)
    assert eng_k["decode_kernels_per_step"] < ref_k["decode_kernels_per_step"]


def test_bench_fid_smoke(tmp_path):
    res = _run("bench_fid.py", tmp_path / "f.json")
    (row,) = res["results"]
    assert row["projected_minutes"] > 0 and row["physical_limit_minutes"] > 0
