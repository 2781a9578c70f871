"""Memory savers, compilation and parallelism, applied to a training objective from outside the models.

The models carry no switch for any of this: a trainer names its transformer blocks and `parallelize` does the
rest, in one fixed order (torchtitan's):

  1. activation checkpointing, per block: the block's forward runs again in backward instead of keeping its
     activations (one extra forward of the blocks: 8 instead of 6 FLOPs per parameter and token). First, so
     that what step 2 compiles is the checkpointed block and what step 3 shards is the compiled one.
  2. torch.compile, per block (not the whole objective: one graph per block compiles once and is reused by
     every block of the same shape; FSDP2's hooks stay outside the compiled region).
  3. distribution:
     "fsdp": FSDP2 ``fully_shard`` on every block, then on the root; parameters all-gathered in bf16 and
             gradients reduced in fp32 on GPU; the optimizer then holds DTensor shards;
     "ddp":  DistributedDataParallel around the objective (gradients all-reduced in fp32 buckets);
     "none": a single process.

"auto" picks none for one process, DDP below `FSDP_AUTO_PARAMS` parameters and FSDP2 above: DDP keeps a full
replica of weights + Adam state per GPU (16 bytes/param in fp32: 12 GB for D-AR-XL's 775M), which is the point
where sharding starts to pay for its extra all-gathers.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Iterable, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from dar_fast.errors import UsageError
from dar_fast.training.distributed import DistEnv

# DDP below this many parameters, FSDP2 above (see the module docstring)
FSDP_AUTO_PARAMS = 600_000_000
STRATEGIES = ("auto", "none", "ddp", "fsdp")

Blocks = Sequence[Iterable[nn.Module]]


def parallelize(objective: nn.Module, env: DistEnv, *, blocks: Blocks = (), compute_blocks: Optional[Blocks] = None,
                activation_checkpointing: bool = False, compile: bool = False, strategy: str = "auto",
                mixed_precision: bool = False) -> Tuple[nn.Module, str]:
    """Apply steps 1-3 of the module docstring to ``objective`` (already on ``env.device``); returns
    (the module the loop calls, the strategy used).

    ``blocks``: lists of transformer blocks, each sharded on its own under FSDP2. ``compute_blocks``: the
    lists checkpointed and compiled (default: ``blocks``). The unwrapped ``objective`` keeps the clean
    parameter names (FSDP2 works in place, so for "fsdp" both are the same object)."""
    compute = blocks if compute_blocks is None else compute_blocks
    if activation_checkpointing:                                    # 1
        checkpoint_blocks(compute)
    if compile:                                                     # 2
        for lst in compute:
            for blk in lst:
                blk.compile()
    strategy = resolve_strategy(strategy, objective, env)           # 3
    if strategy == "none":
        return objective, strategy
    if strategy == "fsdp":
        pd = torch.bfloat16 if (mixed_precision and env.device.type == "cuda") else None
        return apply_fsdp(objective, blocks, env, param_dtype=pd), strategy
    from torch.nn.parallel import DistributedDataParallel as DDP
    dev_ids = [env.device.index] if env.device.type == "cuda" else None
    # buffers (VQ usage statistics) are never trained: no per-step broadcast (the option's name changed in 2.12)
    params = inspect.signature(DDP.__init__).parameters
    kw = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return DDP(objective, device_ids=dev_ids, gradient_as_bucket_view=True, **kw), strategy


def checkpoint_blocks(blocks: Blocks) -> None:
    """Activation checkpointing of every block, in place: while training with gradients on, a block's forward
    runs under ``torch.utils.checkpoint`` (non-reentrant); in eval or under no_grad it runs as is. The block's
    forward is replaced on the instance, so parameter names (checkpoints, exports) do not change."""
    for lst in blocks:
        for blk in lst:
            if getattr(blk, "_checkpointed", False):
                continue
            blk.forward = _checkpointed_forward(blk, blk.forward)
            blk._checkpointed = True


def _checkpointed_forward(blk: nn.Module, inner):
    def forward(*args, **kwargs):
        if blk.training and torch.is_grad_enabled():
            return checkpoint(inner, *args, use_reentrant=False, **kwargs)
        return inner(*args, **kwargs)
    return forward


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def resolve_strategy(strategy: str, module: nn.Module, env: DistEnv) -> str:
    if strategy not in STRATEGIES:
        raise UsageError(f"unknown distribution strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if strategy == "auto":
        if not env.distributed:
            return "none"
        return "fsdp" if count_params(module) >= FSDP_AUTO_PARAMS else "ddp"
    if not env.distributed:
        return "none"          # one process: nothing to replicate or shard
    return strategy


def _fully_shard():
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard        # torch >= 2.6
    except ImportError:
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard  # torch 2.4 / 2.5
    return fully_shard, MixedPrecisionPolicy


def apply_fsdp(module: nn.Module, blocks: Blocks, env: DistEnv, param_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """FSDP2: ``fully_shard`` each block of every list in ``blocks``, then the root. In place; returns module."""
    fully_shard, MixedPrecisionPolicy = _fully_shard()
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for lst in blocks:
        lst = list(lst)
        for i, blk in enumerate(lst):
            # the last block's parameters are needed again at once by backward: keep them gathered
            fully_shard(blk, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(lst) - 1)
    fully_shard(module, mesh=mesh, mp_policy=mp)
    return module


@contextlib.contextmanager
def grad_sync(model: nn.Module, strategy: str, sync: bool):
    """Gradient accumulation: skip the all-reduce / reduce-scatter on every micro-batch but the last."""
    if sync or strategy == "none":
        yield
    elif strategy == "ddp":
        with model.no_sync():
            yield
    else:  # fsdp
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
