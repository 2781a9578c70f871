"""Tokenize a data set once (`dar-fast extract-codes`): codes for AR training, sharded over ranks.

Output directory:

    codes.npy    (M, A, N) int16 when the codebook has <= 32768 entries, else int32; A = 2 with --flip
                 (the image, then its horizontal mirror), else 1. A memory-mapped .npy: train-ar reads rows
                 straight from the page cache.
    labels.npy   (M,) int64 class ids in data-set order; -1 for an image that could not be decoded (skipped by
                 train-ar, counted in meta.json).
    meta.json    sizes, dtype, codebook, code range, the tokenizer's config, skipped count, data source. Written
                 last: a directory without it is unfinished.

Images go through the ADM centre crop to the tokenizer's size in data-set order (``data.make_ordered_loader``);
rank r of W encodes the contiguous block [r*M/W, (r+1)*M/W) and writes its rows into the shared ``*.partial``
files that rank 0 created; after a barrier rank 0 renames them into place and writes meta.json (temp file +
rename), so a crash never leaves a directory that looks finished. Codes are computed by ``tok.encode`` in
float32 of the images the loader yields, so they equal it exactly. Which decoder made those images is in
meta.json ("loader"): "torch" is the reference PIL recipe; "dali" (the default where nvidia-dali imports; on the
GPU when the device is CUDA) resizes in one antialiased-cubic step, ~1 grey level away from PIL, so its codes are
tok.encode of the DALI-preprocessed images; "memory" is in-memory arrays.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from dar_fast.errors import UsageError

CODES_NAME = "codes.npy"
LABELS_NAME = "labels.npy"
META_NAME = "meta.json"
FORMAT = "dar-fast-codes/1"


def code_dtype(codebook_size: int):
    return np.int16 if codebook_size <= 32768 else np.int32


def extract_codes(tokenizer, data, out: str, *, loader: str = "auto", flip: bool = False, batch_size: int = 64,
                  num_workers: int = 2, device: str = "auto", overwrite: bool = False, env=None,
                  quiet: bool = False) -> dict:
    """Encode every image of ``data`` with ``tokenizer`` (a path or a Tokenizer) into ``out``; returns meta."""
    from dar_fast.training import distributed as D
    from dar_fast.training.data import LOADERS, ArraySource, make_ordered_loader, open_source
    own_env = env is None
    if own_env:
        env = D.init_distributed(device)
    try:
        if loader not in LOADERS:
            raise UsageError(f"unknown loader {loader!r}; choose one of {', '.join(LOADERS)}")
        if batch_size <= 0:
            raise UsageError(f"--batch-size must be positive, got {batch_size}")
        log = D.RankLog(env, 0, quiet=quiet)
        if isinstance(tokenizer, (str, os.PathLike)):
            from dar_fast.api import load_tokenizer
            tok = load_tokenizer(os.fspath(tokenizer), device=env.device)
            tok_name = os.fspath(tokenizer)
        else:
            tok, tok_name = tokenizer.to(env.device).eval(), None
        H, W = tok.image_size
        if H != W:
            raise UsageError(f"extract-codes needs a square tokenizer, this one is {H}x{W}")
        ok = True
        msg = ""
        if env.is_main:
            if os.path.exists(os.path.join(out, META_NAME)) and not overwrite:
                ok, msg = False, f"{out} already holds extracted codes ({META_NAME}); pass --overwrite or another --out"
            else:
                try:
                    os.makedirs(out, exist_ok=True)
                except OSError as e:
                    ok, msg = False, f"cannot create --out {out}: {e.strerror or e}"
        D.agree(ok, msg, env)
        try:
            source = open_source(data)
        except (PermissionError, NotADirectoryError, ImportError) as e:
            raise UsageError(str(e)) from e
        if loader == "memory" and not isinstance(source, ArraySource):
            raise UsageError("loader='memory' takes in-memory arrays ('digits'); use 'torch' or 'dali' for files")
        workers = 0 if isinstance(source, ArraySource) or num_workers <= 0 else int(num_workers)
        ld = make_ordered_loader(source, H, batch_size, rank=env.rank, world_size=env.world_size, loader=loader,
                                 device=env.device, num_workers=workers)
        M = len(source)
        A = 2 if flip else 1
        N = tok.num_tokens
        dtype = code_dtype(tok.codebook_size)
        codes_tmp = os.path.join(out, CODES_NAME + ".partial")
        labels_tmp = os.path.join(out, LABELS_NAME + ".partial")
        if env.is_main:
            for p in (os.path.join(out, META_NAME), os.path.join(out, CODES_NAME), os.path.join(out, LABELS_NAME)):
                if os.path.exists(p):
                    os.remove(p)
            np.lib.format.open_memmap(codes_tmp, mode="w+", dtype=dtype, shape=(M, A, N)).flush()
            np.lib.format.open_memmap(labels_tmp, mode="w+", dtype=np.int64, shape=(M,)).flush()
        D.barrier(env)
        mine = ld.indices                                   # this rank's block [r*M/W, (r+1)*M/W)
        codes_mm = np.load(codes_tmp, mmap_mode="r+")
        labels_mm = np.load(labels_tmp, mmap_mode="r+")
        all_labels = np.asarray(source.labels, dtype=np.int64)
        if len(mine):
            labels_mm[mine[0]:mine[-1] + 1] = -1            # until encoded: a row never reached reads as skipped
        cmin, cmax = None, None
        t0 = time.perf_counter()
        done = 0
        for x, _, idx in ld:                                # decodable images only, in data-set order
            idx = idx.numpy()
            with torch.no_grad():
                c = [tok.encode(x)]
                if flip:
                    c.append(tok.encode(x.flip(-1)))
            c = torch.stack(c, dim=1).cpu().numpy()                                      # (b, A, N)
            cmin = int(c.min()) if cmin is None else min(cmin, int(c.min()))
            cmax = int(c.max()) if cmax is None else max(cmax, int(c.max()))
            codes_mm[idx] = c.astype(dtype)
            labels_mm[idx] = all_labels[idx]
            done += len(idx)
        bad = np.asarray(ld.corrupt, dtype=np.int64)        # undecodable: label -1 (train-ar skips), codes 0
        skipped = len(bad)
        codes_mm[bad] = 0
        labels_mm[bad] = -1
        done += skipped
        if done != len(mine):
            raise RuntimeError(f"internal error: rank {env.rank} accounted for {done} of its {len(mine)} images")
        codes_mm.flush()
        labels_mm.flush()
        del codes_mm, labels_mm
        dt = time.perf_counter() - t0
        stats = D.all_gather_object(dict(skipped=skipped, cmin=cmin, cmax=cmax, n=done, s=dt), env)
        D.barrier(env)
        if sum(s["skipped"] for s in stats) >= M:           # every rank sees the same stats: all raise alike
            if env.is_main:
                for p in (codes_tmp, labels_tmp):
                    if os.path.exists(p):
                        os.remove(p)
            from dar_fast.errors import UsageError
            raise UsageError(f"none of the {M} images of {data} could be decoded (all corrupt or unreadable); "
                             f"no codes written to {out}")
        meta = None
        if env.is_main:
            mins = [s["cmin"] for s in stats if s["cmin"] is not None]
            maxs = [s["cmax"] for s in stats if s["cmax"] is not None]
            meta = dict(format=FORMAT, num_images=M, num_aug=A, num_tokens=N, codebook_size=tok.codebook_size,
                        dtype=np.dtype(dtype).name, flip=bool(flip), num_classes=int(all_labels.max()) + 1,
                        skipped=sum(s["skipped"] for s in stats),
                        code_min=min(mins) if mins else 0, code_max=max(maxs) if maxs else 0,
                        image_size=H, data=str(data) if isinstance(data, (str, os.PathLike)) else type(data).__name__,
                        tokenizer=tok_name, tokenizer_config=tok.cfg.to_dict(), world_size=env.world_size,
                        loader=ld.backend, seconds=max(s["s"] for s in stats))
            os.replace(codes_tmp, os.path.join(out, CODES_NAME))
            os.replace(labels_tmp, os.path.join(out, LABELS_NAME))
            tmp = os.path.join(out, META_NAME + ".tmp")
            with open(tmp, "w") as f:
                json.dump(meta, f, indent=1)
            os.replace(tmp, os.path.join(out, META_NAME))
            log.info(f"extract-codes: {M} images x {A} -> {out} ({ld.backend} loader, {N} tokens, "
                     f"{meta['dtype']}, {M * A / max(meta['seconds'], 1e-9):.1f} img/s, {meta['skipped']} skipped)")
        meta = D.broadcast_object(meta, env)
        D.barrier(env)
        return meta
    finally:
        if own_env:
            D.shutdown(env)
