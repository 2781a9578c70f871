"""training/parallelize.py: activation checkpointing from outside the model changes memory, not the math."""
import torch

from dar_fast.models import ARModel
from dar_fast.training import parallelize as par
from dar_fast.training.distributed import DistEnv
from dar_fast.training.losses import ARObjective

from helpers import tiny_ar


def _grads(obj, codes, labels):
    obj.zero_grad(set_to_none=True)
    obj(codes, labels)["loss"].backward()
    return {n: p.grad.clone() for n, p in obj.named_parameters()}


def test_checkpointing_same_gradients_names_and_recomputes_every_block(monkeypatch):
    torch.manual_seed(0)
    ar = tiny_ar()
    plain = ARObjective(ar).train()
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, ar.vocab_size, (3, ar.num_tokens), generator=g)
    labels = torch.randint(0, ar.num_classes, (3,), generator=g)
    want = _grads(plain, codes, labels)
    keys = list(ar.state_dict())

    twin = ARModel(ar.cfg)
    twin.load_state_dict(ar.state_dict())
    obj = ARObjective(twin).train()
    wrapped, strategy = par.parallelize(obj, DistEnv(), blocks=[twin.layers], activation_checkpointing=True)
    assert wrapped is obj and strategy == "none"
    calls = []
    orig = par.checkpoint
    monkeypatch.setattr(par, "checkpoint", lambda *a, **k: calls.append(1) or orig(*a, **k))
    got = _grads(wrapped, codes, labels)
    assert len(calls) == len(twin.layers)                            # every block checkpointed
    assert list(twin.state_dict()) == keys                           # parameter names unchanged
    assert all(torch.allclose(got[n], want[n], atol=1e-6, rtol=1e-5) for n in want)
    with torch.no_grad():
        obj(codes, labels)
    assert len(calls) == len(twin.layers)                            # never without gradients


def test_strategy_resolution():
    m = torch.nn.Linear(2, 2)
    assert par.resolve_strategy("auto", m, DistEnv()) == "none"
    assert par.resolve_strategy("fsdp", m, DistEnv()) == "none"      # one process: nothing to shard
    assert par.resolve_strategy("auto", m, DistEnv(world_size=2)) == "ddp"
    try:
        par.resolve_strategy("zero3", m, DistEnv())
    except ValueError as e:
        assert "zero3" in str(e)
    else:
        raise AssertionError("unknown strategy accepted")
