"""Extracted codes as training data: `CodeSet` (a directory written by `dar-fast extract-codes`) and
`CodesLoader`, the AR trainer's endless, resumable batches, in the order and with the resume state every image
loader uses (`sharding.Sharding`, `sharding.StreamState`)."""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from dar_fast.config import ARConfig
from dar_fast.errors import UsageError
from dar_fast.seeding import key
from dar_fast.training.extract_codes import CODES_NAME, LABELS_NAME, META_NAME

from .sharding import Sharding, StreamState

__all__ = ["CodeSet", "CodesLoader"]


class CodeSet:
    """A directory written by `dar-fast extract-codes`: codes (M, A, N) int16/int32 memory-mapped, labels (M,)
    int64 (-1 marks an image that could not be decoded), meta.json."""

    def __init__(self, path: str):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"code directory not found: {path} (write one with dar-fast extract-codes)")
        mpath = os.path.join(path, META_NAME)
        if not os.path.exists(mpath):
            raise UsageError(f"{path} is not a finished code directory (no {META_NAME}); run dar-fast extract-codes")
        try:
            with open(mpath) as f:
                self.meta = json.load(f)
            self.codes = np.load(os.path.join(path, CODES_NAME), mmap_mode="r")
            self.labels = np.load(os.path.join(path, LABELS_NAME))
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read the codes in {path}: {e}") from e
        if self.codes.ndim != 3 or self.labels.shape != (self.codes.shape[0],):
            raise UsageError(f"{path}: codes {self.codes.shape} / labels {self.labels.shape} are not (M, A, N) / (M,)")
        self.path = path
        self.valid = np.flatnonzero(self.labels >= 0)
        if len(self.valid) == 0:
            raise UsageError(f"{path} holds no usable codes")

    @property
    def num_tokens(self) -> int:
        return int(self.codes.shape[2])

    @property
    def num_samples(self) -> int:
        return int(len(self.valid))

    def check(self, cfg: ARConfig) -> None:
        m = self.meta
        if self.num_tokens != cfg.block_size:
            raise UsageError(f"codes have {self.num_tokens} tokens per image; the AR config expects block_size "
                             f"{cfg.block_size} (choose a preset that matches the tokenizer)")
        cb = int(m.get("codebook_size", 0))
        if cb != cfg.vocab_size:
            raise UsageError(f"codes come from a codebook of {cb}; the AR config has vocab_size {cfg.vocab_size}")
        lo, hi = int(m.get("code_min", 0)), int(m.get("code_max", cb - 1))
        if lo < 0 or hi >= cfg.vocab_size:
            raise UsageError(f"codes out of range [{lo}, {hi}] for vocab_size {cfg.vocab_size}")
        top = int(self.labels.max())
        if top >= cfg.num_classes:
            raise UsageError(f"labels go up to {top} but the AR config has num_classes {cfg.num_classes}")


class CodesLoader(StreamState):
    """Endless, resumable batches (codes (B,N) int64, labels (B,) int64) of one rank.

    The usable rows are sharded like images (`sharding.Sharding`, drop_last): epoch e is
    ``epoch_permutation(seed, e)`` of them and rank r takes positions r::world of its first
    (n // (B*world)) * B*world entries. Each row's augmentation (which of the A extracted variants, when
    extracted with --flip) is drawn per epoch from ``key(seed, "code-augment", e)``. state_dict() = (epoch,
    index) and the order settings."""

    what = "code loader"

    def __init__(self, cs: CodeSet, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 device="cpu"):
        self.cs, self.batch_size, self.rank, self.world_size, self.seed = cs, int(batch_size), rank, world_size, seed
        self.device = torch.device(device)
        self.num_samples = cs.num_samples
        self._shard = Sharding(self.num_samples, self.batch_size, rank, world_size, seed, drop_last=True,
                               what="code set", hint="lower --batch-size")
        self.per_rank = self._shard.per_rank
        self.steps_per_epoch = self.per_rank // self.batch_size
        self.num_aug = int(cs.codes.shape[1])
        self.epoch, self.index = 0, 0
        self._cache_epoch, self._rows, self._augs = None, None, None

    def _epoch_tables(self, epoch: int):
        if self._cache_epoch != epoch:
            g = torch.Generator().manual_seed(key(self.seed, "code-augment", epoch))
            augs = torch.randint(self.num_aug, (self.num_samples,), generator=g).numpy()
            mine = self._shard.indices(epoch)
            self._rows, self._augs = self.cs.valid[mine], augs[mine]
            self._cache_epoch = epoch
        return self._rows, self._augs

    def __iter__(self):
        return self

    def __next__(self):
        rows, augs = self._epoch_tables(self.epoch)
        sl = slice(self.index, self.index + self.batch_size)
        r, a = rows[sl], augs[sl]
        order = np.argsort(r, kind="stable")             # sequential reads from the memory map
        codes = np.empty((len(r), self.cs.num_tokens), dtype=np.int64)
        codes[order] = self.cs.codes[r[order], a[order]]
        labels = self.cs.labels[r].astype(np.int64)
        self.index += self.batch_size
        if self.index >= self.per_rank:
            self.epoch, self.index = self.epoch + 1, 0
        nb = self.device.type == "cuda"
        return (torch.from_numpy(codes).to(self.device, non_blocking=nb),
                torch.from_numpy(labels).to(self.device, non_blocking=nb))

    def state_dict(self) -> dict:
        return self._state(self.epoch, self.index)

    def load_state_dict(self, sd: dict) -> None:
        self.epoch, self.index = self._load_position(sd, self.per_rank)
