"""Training input pipelines: DALI, a torch DataLoader fallback and in-memory arrays, under one contract.

Every endless loader (`make_loader`) is an infinite iterator of

    images  float32 (B, 3, S, S) in [-1, 1] on the requested device
    labels  int64   (B,)

with B the per-rank batch size. What a rank sees is a pure function of (seed, rank, world_size, batch_size,
drop_last) and of the data: the worker count, the backend and the device change nothing but decoder rounding.
``state_dict()`` records the stream position just after the last sample handed out; ``load_state_dict``
continues at exactly the next batch.

    sources.py     ImageFolder trees, webdataset .tar shards, in-memory arrays, the digits set
    transforms.py  the per-sample crop/flip recipe (ADM centre crop, LlamaGen random crop) and the PIL decoder
    sharding.py    the per-rank order (epoch permutations, rank slices), its resume state, global batch split
    loaders.py     the endless loaders (memory, torch) and what every loader shares; the factory `make_loader`
    dali.py        the DALI backend (GPU or CPU decode, PIL fallback on a failing batch)
    ordered.py     one ordered pass over a rank's block (`make_ordered_loader`, for extract-codes)
    codes.py       extracted codes (`CodeSet`) and their loader (`CodesLoader`, the AR trainer's data)

Randomness (order, augmentation) comes from `dar_fast.seeding.key`, by (seed, stream, epoch, index).
"""
from .codes import CodeSet, CodesLoader
from .dali import DALI_PIP_PACKAGE, dali_available
from .loaders import LOADERS, DaliLoader, MemoryLoader, TorchLoader, make_loader
from .ordered import OrderedLoader, make_ordered_loader
from .sharding import epoch_permutation, shard_bounds, split_global_batch
from .sources import (IMG_EXTENSIONS, ArraySource, FolderSource, Source, TarSource, digits_split,
                      load_digits_arrays, open_source, read_regular_file)
from .transforms import AUGMENTS, CropPlan, apply_plan, plan_crop, sample_uniforms

__all__ = [
    "IMG_EXTENSIONS", "AUGMENTS", "LOADERS", "DALI_PIP_PACKAGE",
    "ArraySource", "FolderSource", "TarSource", "Source", "open_source", "read_regular_file",
    "load_digits_arrays", "digits_split",
    "split_global_batch", "epoch_permutation", "sample_uniforms", "CropPlan", "plan_crop", "apply_plan",
    "dali_available", "make_loader", "MemoryLoader", "TorchLoader", "DaliLoader",
    "shard_bounds", "make_ordered_loader", "OrderedLoader", "CodeSet", "CodesLoader",
]
