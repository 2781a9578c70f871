"""The kernel benchmarks run end to end (--smoke, CPU, Triton interpreted) and write complete JSON."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dar_fast.kernels.backend import triton_available

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
META_KEYS = {"device", "device_type", "mem_bw_gbs", "ceiling_source", "torch", "triton", "cuda", "python", "date",
             "git_sha", "git_dirty", "smoke", "triton_interpret", "argv"}
RESULT_KEYS = {"case", "impl", "ms", "ms_p20", "ms_p80", "method", "bytes", "gbps", "frac_mem_bw"}


@pytest.mark.parametrize("name,cases", [
    ("vq_nearest", {"M=32 n=256 d=8", "M=17 n=100 d=13"}),
    ("rope", {"tokenizer 2D fwd", "tokenizer 2D fwd+bwd", "ar_decode 1D"}),
    ("flow_step", {"euler (2, 3, 16, 16)", "ab (2, 3, 16, 16)", "ab_uint8 (2, 3, 16, 16)"}),
    ("rms_norm", {"ar_decode fused residual", "train fwd+bwd"}),
    ("swiglu", {"ar_decode", "train fwd+bwd"}),
    ("adaln", {"modulate", "gated+modulate", "gated+modulate fwd+bwd"}),
    ("decode_attention", {"batch1"}),
    ("noise", {"batch2"}),
])
def test_bench_smoke(tmp_path, name, cases):
    out = tmp_path / f"{name}.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("DAR_FAST_BACKEND", None)
    proc = subprocess.run([sys.executable, str(BENCH / f"bench_{name}.py"), "--smoke", "--device", "cpu",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["benchmark"] == name
    meta = data["meta"]
    assert META_KEYS <= set(meta), META_KEYS - set(meta)
    assert meta["device_type"] == "cpu" and meta["smoke"] is True and meta["mem_bw_gbs"] > 0
    assert meta["date"][:2] == "20" and meta["torch"]
    rows = data["results"]
    assert {r["case"] for r in rows} == cases
    impls = {r["impl"] for r in rows}
    assert "torch" in impls and ("triton" in impls) == triton_available()
    for r in rows:
        assert RESULT_KEYS <= set(r), RESULT_KEYS - set(r)
        assert r["ms"] > 0 and r["gbps"] > 0 and r["bytes"] > 0
        if r["impl"] != "torch":
            assert r["speedup_vs_torch"] > 0
    if name == "noise" and triton_available():
        assert all(r["triton_bits_equal_reference"] for r in rows)
    if name == "vq_nearest":
        assert all("tflops" in r and r["index_mismatches_vs_torch"] == 0 for r in rows)
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name], "a temporary file was left behind"
