"""bench_sampling measures warm and says when a timed measurement compiled: the stage profile and ms per decode
step run an untimed pass first, and dynamo's graph counter is recorded around each (trace-only backend, fast)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_sampling as bs  # noqa: E402
from dar_fast.pipeline import Pipeline  # noqa: E402


@pytest.fixture(scope="module")
def smoke():
    tok_cfg, acfgs = bs.smoke_configs()
    return bs.build(tok_cfg, acfgs["smoke"], torch.device("cpu"), torch.float32)


def test_dynamo_graphs_counts_compiles(monkeypatch):
    c0 = bs.dynamo_graphs()
    f = torch.compile(lambda x: x * 3 + 1, backend="eager")
    f(torch.ones(5))
    assert bs.dynamo_graphs() == c0 + 1
    f(torch.ones(5))                      # cached: no new graph
    assert bs.dynamo_graphs() == c0 + 1


def test_stage_profile_and_decode_step_are_measured_warm(smoke, monkeypatch, one_thread):
    monkeypatch.setenv("DAR_FAST_COMPILE_BACKEND", "eager")     # trace only: the same graphs and guards
    tok, ar = smoke
    labels = torch.tensor([1, 2])
    # a compiled pipeline that has never run: time_engine's warm-up absorbs every compile
    pipe = Pipeline(tokenizer=tok, ar=ar, compile=True)
    assert pipe.engine_mode == "compiled"
    comp = {}
    best, prof, first = bs.time_engine(pipe, 2, 4.0, reps=1, compiles=comp)
    assert best > 0 and first is None and set(prof) == {"ar", "tokenizer"} and prof["ar"] > 0
    assert comp["warmup"] > 0 and comp["timed_reps"] == 0 and comp["profile"] == 0, comp
    # what made the first digits JSON wrong: an eager pipeline on the same model (shared KV buffers) re-running
    # its decode steps, then the compiled pipeline's measurements; both must stay warm now
    eager = Pipeline(tokenizer=tok, ar=ar)
    eager.sample(labels, cfg=4.0)
    ms, n = bs.ms_per_decode_step(eager, 2, 4.0)
    assert ms > 0 and n == 0
    prof, c = bs.stage_profile(pipe, labels, 4.0)
    assert c == {"warmup": 0, "timed": 0} and prof["tokenizer"] > 0
    ms, n = bs.ms_per_decode_step(pipe, 2, 4.0)
    assert ms > 0 and n == 0
    # and the re-runs left the engine giving the eager engine's tokens
    a, b = pipe.sample(labels, cfg=4.0, seed=3), eager.sample(labels, cfg=4.0, seed=3)
    assert torch.equal(a.tokens, b.tokens)
