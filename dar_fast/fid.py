"""`dar-fast fid`: FID-50K sample generation, sharded over processes, resumable, identical for any process count.

Sample i gets class i mod C (or, with --random-classes, a class drawn from its own key) and the sampling
key (seed, i), so every sample is a function of its index alone: the same `.npz` comes out of 1 or G
processes and of any batch size (tokens identical; pixels up to float rounding).

Work is cut into shards of --batch-size consecutive indices; rank r of W takes shards r, r+W, ...
Each finished shard is written atomically (temporary file + rename) into <out>.shards/; a rerun skips
finished shards, so a crash loses at most one batch per rank. A manifest pins the settings: a resume with
other settings is refused. Rank 0 then streams the shards into the ADM-compatible `.npz`
(`arr_0` uint8 (N,H,W,3), `arr_1` int64 labels) without holding all images in memory.

    dar-fast fid --tokenizer TOK --ar AR --num-samples 50000 --batch-size 64 --cfg 1.1,10 --seed 0 --out samples.npz
    torchrun --nproc_per_node=8 -m dar_fast.cli fid ...same arguments...
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import time
import zipfile

import numpy as np
import torch

from dar_fast.eval.npz import save_npz_atomic
from dar_fast.io import atomic_write, write_json_atomic


def register(sub):
    p = sub.add_parser("fid", help="generate FID-50K samples (sharded, resumable) into an ADM-style .npz")
    p.add_argument("--tokenizer", default=None, help="tokenizer checkpoint (default: the embedded digits model)")
    p.add_argument("--ar", default=None)
    p.add_argument("--tokenizer-config", default=None)
    p.add_argument("--ar-config", default=None)
    p.add_argument("--num-samples", type=int, default=50000)
    p.add_argument("--batch-size", type=int, default=64, help="per-process batch (also the shard size)")
    p.add_argument("--cfg", default="1.1,10", help="scale, or start,end linear schedule (paper: L 1.1,8; XL 1.1,10)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random-classes", action="store_true",
                   help="uniformly random classes from each sample's key (the released script's choice) instead of i mod C")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--keep-shards", action="store_true", help="keep <out>.shards/ after assembling")
    p.set_defaults(func=run)


def _parse_cfg(s):
    parts = [float(x) for x in str(s).split(",")]
    if len(parts) not in (1, 2):
        raise ValueError(f"--cfg takes a scale or start,end; got {s!r}")
    return parts[0] if len(parts) == 1 else tuple(parts)


def class_of(i: int, seed: int, num_classes: int, random_classes: bool) -> int:
    if not random_classes:
        return i % num_classes
    from dar_fast.seeding import noise_seed
    g = torch.Generator().manual_seed(noise_seed(seed ^ 0x5DEECE66D, i))
    return int(torch.randint(num_classes, (1,), generator=g))


def _file_digest(path) -> str:
    """Cheap identity of a checkpoint: size + hash of the first and last MiB."""
    if path is None:
        return "digits"
    st = os.stat(path)
    h = hashlib.sha1(str(st.st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, st.st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()


def _dist():
    """(rank, world, barrier) from torchrun's environment; a plain run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world == 1:
        return 0, 1, lambda: None, lambda: None
    import torch.distributed as dist
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return rank, world, dist.barrier, dist.destroy_process_group


def _write_npy_member(zf: zipfile.ZipFile, name: str, shape, dtype, chunks):
    """Stream a .npy member into an open zip without materialising the whole array."""
    with zf.open(name + ".npy", "w", force_zip64=True) as f:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
        np.lib.format.write_array_header_2_0(f, header)
        for c in chunks:
            f.write(np.ascontiguousarray(c, dtype=dtype).tobytes())


def assemble(shard_paths, out: str, num: int):
    """Shards (ordered) -> ADM `.npz` with arr_0 (N,H,W,3) uint8 and arr_1 (N,) labels, atomically."""
    first = np.load(shard_paths[0])
    H, W, C = first["images"].shape[1:]

    def write(f):
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            _write_npy_member(zf, "arr_0", (num, H, W, C), np.uint8, (np.load(p)["images"] for p in shard_paths))
            _write_npy_member(zf, "arr_1", (num,), np.int64, (np.load(p)["labels"] for p in shard_paths))
    atomic_write(out, write)


def run(args) -> int:
    from tqdm import tqdm

    from dar_fast.pipeline import Pipeline

    if not args.out.endswith(".npz"):
        raise ValueError(f"--out must end in .npz, got {args.out}")
    if args.num_samples < 1 or args.batch_size < 1:
        raise ValueError("--num-samples and --batch-size must be >= 1")
    if (args.tokenizer is None) != (args.ar is None):
        raise ValueError("give both --tokenizer and --ar, or neither for the embedded digits model")
    cfg = _parse_cfg(args.cfg)
    rank, world, barrier, shutdown = _dist()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    device = args.device or (f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    if args.tokenizer is None:
        pipe = Pipeline.from_pretrained("digits", device=device, dtype=dtype)
    else:
        pipe = Pipeline.from_pretrained(args.tokenizer, args.ar, device=device, dtype=dtype,
                                        tokenizer_config=args.tokenizer_config, ar_config=args.ar_config)
    C, N, B = pipe.num_classes, args.num_samples, args.batch_size
    shard_dir = args.out + ".shards"
    settings = dict(num_samples=N, batch_size=B, cfg=cfg if isinstance(cfg, float) else list(cfg),
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                    random_classes=args.random_classes, tokenizer=_file_digest(args.tokenizer),
                    ar=_file_digest(args.ar), dtype=str(pipe.ar.dtype), image_size=list(pipe.tok.image_size))
    manifest = os.path.join(shard_dir, "manifest.json")
    if rank == 0:
        os.makedirs(shard_dir, exist_ok=True)
        if os.path.exists(manifest):
            old = json.load(open(manifest))
            if old != settings:
                diff = {k: (old.get(k), settings.get(k)) for k in set(old) | set(settings) if old.get(k) != settings.get(k)}
                raise ValueError(f"{shard_dir} holds shards made with other settings {diff} (on disk, now); "
                                 "use another --out or delete that directory")
        else:
            write_json_atomic(manifest, settings)
    barrier()
    num_shards = (N + B - 1) // B
    mine = [k for k in range(rank, num_shards, world)]
    todo = [k for k in mine if not os.path.exists(os.path.join(shard_dir, f"shard_{k:06d}.npz"))]
    bar = tqdm(total=len(mine) * B, initial=(len(mine) - len(todo)) * B, unit="img", disable=rank != 0 or None,
               desc=f"fid samples (rank 0 of {world})")
    t0, done = time.time(), 0
    for k in todo:
        idx = list(range(k * B, min(N, (k + 1) * B)))
        labels = [class_of(i, args.seed, C, args.random_classes) for i in idx]
        out = pipe.sample(labels, cfg=cfg, seed=[args.seed] * len(idx), sample_ids=idx, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p)
        save_npz_atomic(os.path.join(shard_dir, f"shard_{k:06d}.npz"), images=out.images.numpy(),
                    labels=np.asarray(labels, dtype=np.int64), tokens=out.tokens.numpy(), indices=np.asarray(idx))
        done += len(idx)
        bar.update(len(idx))
        bar.set_postfix(img_per_s=f"{done * world / max(time.time() - t0, 1e-9):.1f}")
    bar.close()
    barrier()
    if rank == 0:
        paths = [os.path.join(shard_dir, f"shard_{k:06d}.npz") for k in range(num_shards)]
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise RuntimeError(f"{len(missing)} shards missing after generation (e.g. {missing[0]})")
        assemble(paths, args.out, N)
        if not args.keep_shards:
            for p in glob.glob(os.path.join(shard_dir, "*")):
                os.remove(p)
            os.rmdir(shard_dir)
        print(f"wrote {args.out}: {N} samples, {time.time() - t0:.1f}s")
    barrier()
    shutdown()
    return 0
