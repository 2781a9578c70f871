"""`dar-fast fid`: FID-50K sample generation, sharded over processes, resumable, identical for any process count.

Sample i gets class i mod C (or, with --random-classes, a class drawn from its own key) and the sampling
key (seed, i), so every sample is a function of its index alone: the same `.npz` comes out of 1 or G
processes and of any batch size (tokens identical; pixels up to float rounding).

Work is cut into shards of --batch-size consecutive indices; rank r of W takes shards r, r+W, ...
(`dar_fast.shards`): each shard is written atomically into <out>.shards/ with its index range, shapes, dtypes
and checksum; a rerun verifies and skips finished shards (a failing one is regenerated, with a line saying
so), so a crash loses at most one batch per rank. Rank 0 then verifies every shard, streams them into the
ADM-compatible `.npz` (`arr_0` uint8 (N,H,W,3), `arr_1` int64 labels) without holding all images in memory,
re-reads that file before it replaces anything, and writes the manifest `<out minus .npz>.json` (settings,
SHA-256 of both checkpoints, versions, date) beside it. A rerun with the same settings does nothing; one with
other settings is refused unless --overwrite. `<out>.lock` keeps two runs from writing the same output.

    dar-fast fid --tokenizer TOK --ar AR --num-samples 50000 --batch-size 64 --cfg 1.1,10 --seed 0 --out samples.npz
    torchrun --nproc_per_node=8 -m dar_fast.cli fid ...same arguments...
"""
from __future__ import annotations

import errno
import os
import sys
import time

import numpy as np
import torch

from dar_fast.defaults import PRECISIONS
from dar_fast.errors import UsageError
from dar_fast.io import file_sha256
from dar_fast.shards import ShardedOutput, ShardWriter, manifest_path


def register(sub):
    p = sub.add_parser("fid", help="generate FID-50K samples (sharded, resumable) into an ADM-style .npz")
    from dar_fast.commands import common
    from dar_fast.defaults import SOLVERS
    p.add_argument("--tokenizer", default=None, help="tokenizer checkpoint (default: the embedded digits model)")
    p.add_argument("--ar", default=None, help="AR checkpoint (give both or neither)")
    p.add_argument("--tokenizer-config", default=None, help="tokenizer preset or JSON/YAML config, if the "
                   "checkpoint has none")
    p.add_argument("--ar-config", default=None, help="AR preset (e.g. D-AR-XL) or JSON/YAML config, if the "
                   "checkpoint has none")
    p.add_argument("--num-samples", type=common.positive_int, default=50000, help="images (default 50000)")
    p.add_argument("--batch-size", type=common.positive_int, default=64,
                   help="per-process batch (also the shard size; default 64)")
    p.add_argument("--cfg", type=common.cfg, default=None, help="scale, or start,end linear schedule (default: the model's "
                   "recommended, e.g. the paper's 1.1,8 for D-AR-L and 1.1,10 for D-AR-XL; else 4.0)")
    p.add_argument("--temperature", type=common.temperature, default=None, help="default: the model's, else 1.0")
    p.add_argument("--top-k", type=common.nonneg_int, default=None, help="default: the model's, else 0 (off)")
    p.add_argument("--top-p", type=common.top_p, default=None, help="default: the model's, else 1.0 (off)")
    p.add_argument("--seed", type=common.seed, default=0, help="sample i uses key (seed, i) (default 0)")
    p.add_argument("--random-classes", action="store_true",
                   help="uniformly random classes from each sample's key (the released script's choice) instead of i mod C")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--device", type=common.device, default=None, help="default: this rank's GPU, else cpu")
    p.add_argument("--steps", type=common.positive_int, default=None,
                   help="diffusion steps of the decode (default: the model's, else the tokenizer's own)")
    p.add_argument("--solver", choices=SOLVERS, default=None,
                   help="flow solver (default: the model's, else adams2 as released)")
    p.add_argument("--precision", choices=PRECISIONS, default="released",
                   help="released (default): AR bfloat16, tokenizer float32 with TF32 matmuls, as the released FID "
                        "script, so the FID compares with the paper's; fast: bfloat16 throughout (CPU: float32)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="weights' dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--threads", type=common.positive_int, default=None,
                   help="CPU threads for torch (default: 1 for small models such as digits, else torch's default)")
    p.add_argument("-v", "--verbose", action="store_true", help="print the thread count")
    p.add_argument("--keep-shards", action="store_true", help="keep <out>.shards/ after assembling")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished --out (or discard unfinished shards) made with other settings")
    p.set_defaults(func=run, threads_handled=True)


def class_of(i: int, seed: int, num_classes: int, random_classes: bool) -> int:
    if not random_classes:
        return i % num_classes
    from dar_fast.seeding import class_seed
    g = torch.Generator().manual_seed(class_seed(seed, i))
    return int(torch.randint(num_classes, (1,), generator=g))


def model_identity(path) -> str:
    """Identity of a checkpoint for the manifest: SHA-256 of its whole content (cached by size + mtime, see
    `dar_fast.io.file_sha256`), so a resumed run never mixes two models that differ anywhere in the file."""
    if path is None:
        from dar_fast.assets import digits_paths
        return "digits:" + ",".join(file_sha256(p)[:16] for p in digits_paths())
    return file_sha256(path)


def _dist():
    """(rank, world, barrier, shutdown, broadcast-from-rank-0) from torchrun's environment; a plain run is rank 0
    of 1. The process group is the trainers' (`dar_fast.training.distributed.init_distributed`)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, lambda: None, lambda: None, lambda obj: obj
    from dar_fast.training import distributed as D
    env = D.init_distributed("auto")
    return (env.rank, env.world_size, lambda: D.barrier(env), lambda: D.shutdown(env),
            lambda obj: D.broadcast_object(obj, env))


def _shard_arrays(pipe, so: ShardedOutput, k: int, args, cfg, C: int) -> dict:
    start, stop = so.index_range(k)
    idx = list(range(start, stop))
    labels = [class_of(i, args.seed, C, args.random_classes) for i in idx]
    out = pipe.sample(labels, cfg=cfg, seed=[args.seed] * len(idx), sample_ids=idx, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, steps=args.steps, solver=args.solver)
    return dict(images=out.images.numpy(), labels=np.asarray(labels, dtype=np.int64))


def _check_args(args):
    from dar_fast.sampling_args import check_sampling_args
    from dar_fast.seeding import check_seed
    if not args.out.endswith(".npz"):
        raise UsageError(f"--out must end in .npz, got {args.out}")
    if args.num_samples < 1 or args.batch_size < 1:
        raise UsageError("--num-samples and --batch-size must be >= 1")
    if (args.tokenizer is None) != (args.ar is None):
        raise UsageError("give both --tokenizer and --ar, or neither for the embedded digits model")
    cfg = args.cfg                                                  # None: the model's recommended setting
    check_sampling_args(cfg=1.0 if cfg is None else cfg, temperature=1.0 if args.temperature is None else
                        args.temperature, top_k=args.top_k or 0, top_p=1.0 if args.top_p is None else args.top_p)
    check_seed(args.seed, "--seed")
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(parent):
        raise UsageError(f"--out: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"--out: directory {parent} is not writable")
    return cfg


def run(args) -> int:
    from tqdm import tqdm
    cfg = _check_args(args)
    rank, world, barrier, shutdown, broadcast = _dist()
    device = args.device or (f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    args.device = device
    from dar_fast import defaults
    from dar_fast.commands.common import apply_threads
    from dar_fast.commands.sample import load_pipeline
    pipe = load_pipeline(args)              # a checkpoint or config that does not load: one line naming the option
    apply_threads(args.threads, sum(p.numel() for m in (pipe.tok, pipe.ar) for p in m.parameters()),
                  verbose=args.verbose and rank == 0)
    # settings not given: the model's recommended ones (e.g. the paper's schedule of a D-AR preset)
    values, sources = defaults.resolve(pipe.defaults, cfg=cfg, temperature=args.temperature, top_k=args.top_k,
                                       top_p=args.top_p, steps=getattr(args, "steps", None),
                                       solver=getattr(args, "solver", None))
    values.update({k: v for k, v in pipe.settings(steps=values.get("steps"), solver=values.get("solver")).items()
                   if k in ("steps", "solver")})
    cfg, args.temperature, args.top_k, args.top_p = (values[k] for k in ("cfg", "temperature", "top_k", "top_p"))
    args.steps, args.solver = values["steps"], values["solver"]
    if rank == 0:
        print("dar-fast fid: sampling: " + defaults.describe(values, sources), file=sys.stderr)
        pr = pipe.precision
        print(f"dar-fast fid: models: tokenizer {pr['tokenizer_dtype']} ({getattr(pipe.tok, 'loaded_weights', 'model')} "
              f"weights), AR {pr['ar_dtype']} ({getattr(pipe.ar, 'loaded_weights', 'model')} weights)"
              + (", TF32 matmuls" if pr["tf32"] else "") + f", precision {pr['mode']}", file=sys.stderr)
    C, N, B = pipe.num_classes, args.num_samples, args.batch_size
    H, W = pipe.tok.output_size()           # the decode size, then output_resolution
    settings = dict(num_samples=N, batch_size=B, cfg=cfg if isinstance(cfg, float) else list(cfg),
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                    random_classes=args.random_classes, tokenizer_sha256=model_identity(args.tokenizer),
                    ar_sha256=model_identity(args.ar), dtype=str(pipe.ar.dtype), image_size=[H, W],
                    steps=args.steps, solver=args.solver, precision=pipe.precision,
                    weights={"tokenizer": getattr(pipe.tok, "loaded_weights", None),
                             "ar": getattr(pipe.ar, "loaded_weights", None)},
                    device_type=torch.device(device).type)
    so = ShardedOutput(args.out, settings, num_items=N, shard_size=B,
                       fields={"images": ((H, W, 3), np.uint8), "labels": ((), np.int64)},
                       outputs={args.out: {"arr_0": "images", "arr_1": "labels"}}, overwrite=args.overwrite,
                       log=lambda m: print(f"dar-fast fid: {m}", file=sys.stderr))
    try:
        if so.begin_on_all_ranks(rank, broadcast):
            if rank == 0:
                print(f"{args.out} is already finished with these settings ({manifest_path(args.out)}); "
                      "nothing to do")
            return 0
        mine = list(range(rank, so.num_shards, world))
        todo = so.pending(mine)
        bar = tqdm(total=N if world == 1 else len(mine) * B, initial=(len(mine) - len(todo)) * B, unit="img",
                   disable=rank != 0 or None, desc=f"fid samples (rank 0 of {world})")
        t0, done = time.time(), 0
        writer = ShardWriter(so)             # hashing and writing overlap the next batch's generation
        try:
            for k in todo:
                writer.put(k, _shard_arrays(pipe, so, k, args, cfg, C))
                n = so.index_range(k)[1] - so.index_range(k)[0]
                done += n
                bar.update(n)
                bar.set_postfix(img_per_s=f"{done * world / max(time.time() - t0, 1e-9):.1f}")
        except BaseException:
            writer.close(raise_error=False)   # keep the shards already queued; the original error wins
            raise
        writer.close()
        bar.close()
        barrier()
        if rank == 0:
            so.finish(regenerate=lambda k: so.write(k, **_shard_arrays(pipe, so, k, args, cfg, C)),
                      keep_shards=args.keep_shards)
            print(f"wrote {args.out} and {manifest_path(args.out)}: {N} samples, {time.time() - t0:.1f}s")
        barrier()
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            # atomic writes: nothing half-written is left under a final name, finished shards are kept
            raise UsageError(f"cannot write {e.filename or args.out}: {e.strerror}; the finished shards are kept: "
                             "free some space and rerun the same command to continue") from None
        raise
    finally:
        so.close()
        shutdown()
    return 0
