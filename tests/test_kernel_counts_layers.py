"""Kernels per decode step by layers (kernel_counts.count_decode_layers): the n_layer 1 / 2 derivation equals
the full-depth count in eager mode, and the compiled count runs the compiled graph without recompiling."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import kernel_counts as kc  # noqa: E402
from dar_fast.config import ARConfig  # noqa: E402


def _cfg():
    # odd sizes; grouped-query attention so the KV repeat is in every layer's count
    return ARConfig(dim=96, n_layer=5, n_head=3, n_kv_head=1, vocab_size=37, block_size=16, num_classes=7)


def test_eager_derivation_equals_full_depth(one_thread):
    by = kc.count_decode_layers("toy", _cfg(), "eager")
    full = kc.count_decode_full("toy", _cfg(), "eager")
    assert by["decode_kernels_per_layer"] > 0
    assert by["decode_kernels_measured_n_layer_2"] > by["decode_kernels_measured_n_layer_1"]
    assert by["decode_kernels_per_step_derived"] == full["decode_kernels_per_step"]
    assert by["modes_run"] == ["eager"]


def test_compiled_by_layers_trace_only(monkeypatch, one_thread):
    monkeypatch.setenv("DAR_FAST_COMPILE_BACKEND", "eager")        # trace only: seconds, same graph and guards
    rows = kc.compiled_preset_rows([("toy", _cfg())], check_eager=True)
    comp = next(r for r in rows if r["impl"] == "kernels-engine-compiled-by-layers")
    eag = next(r for r in rows if r["impl"] == "kernels-engine-eager-by-layers")
    assert comp["modes_run"] == ["compiled"], comp["modes_run"]        # no silent fallback to eager
    assert comp["compiles_while_counting"] == {1: 0, 2: 0}
    assert comp["decode_kernels_per_layer"] > 0
    assert comp["decode_kernels_per_step_derived"] == (comp["decode_kernels_measured_n_layer_1"]
                                                      + 4 * comp["decode_kernels_per_layer"])
    assert eag["derivation_exact"] is True and eag["full_depth_count"] == eag["decode_kernels_per_step_derived"]
