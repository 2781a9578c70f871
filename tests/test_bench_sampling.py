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
    fast = [r for r in res["results"] if r["engine"] == "fast"]
    eager = [r for r in res["results"] if r["engine"] == "eager"]
    assert {r["batch"] for r in fast} == {1, 4} and eager
    for r in fast:
        assert r["images_per_s"] > 0 and r["ar_ms"] > 0 and r["tokenizer_ms"] > 0
    b1 = next(r for r in fast if r["batch"] == 1)
    assert b1["first_preview_ms"] > 0 and b1["ar_weight_read_floor_ms"] > 0
    assert all(r["speedup_of_fast"] > 0 for r in eager)


def test_bench_fid_smoke(tmp_path):
    res = _run("bench_fid.py", tmp_path / "f.json")
    (row,) = res["results"]
    assert row["projected_minutes"] > 0 and row["physical_limit_minutes"] > 0
