"""Tokenize a data set once (`dar-fast extract-codes`): codes for AR training, sharded over ranks.

Output directory:

    codes.npy    (M, A, N) int16 when the codebook has <= 32768 entries, else int32; A = 2 with --flip
                 (the image, then its horizontal mirror), else 1. A memory-mapped .npy: train-ar reads rows
                 straight from the page cache.
    labels.npy   (M,) int64 class ids in data-set order; -1 for an image that could not be decoded (skipped by
                 train-ar, counted in meta.json).
    meta.json    sizes, dtype, codebook, code range, the tokenizer's config, skipped count, data source. Written
                 last: a directory without it is unfinished.

Images go through the ADM centre crop to the tokenizer's size (the reference PIL recipe of data.py) in data-set
order; rank r of W encodes the contiguous block [r*M/W, (r+1)*M/W) and writes its rows into the shared
``*.partial`` files that rank 0 created; after a barrier rank 0 renames them into place and writes meta.json
(temp file + rename), so a crash never leaves a directory that looks finished. Codes are computed by
``tok.encode`` in float32, so they equal it exactly.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

CODES_NAME = "codes.npy"
LABELS_NAME = "labels.npy"
META_NAME = "meta.json"
FORMAT = "dar-fast-codes/1"


class _OrderedImages(torch.utils.data.Dataset):
    """Picklable: (index, uint8 (S,S,3) image or zeros, ok) for the data-set indices given, centre-cropped."""

    def __init__(self, source, image_size: int, indices: np.ndarray):
        self.source, self.S, self.indices = source, int(image_size), indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        from dar_fast.training.data import apply_plan, plan_crop
        idx = int(self.indices[k])
        S = self.S
        imgs = getattr(self.source, "images", None)
        if imgs is not None and imgs.shape[1:3] == (S, S):          # in-memory and already S x S: identity crop
            return idx, torch.from_numpy(np.ascontiguousarray(imgs[idx])), True
        try:
            img = self.source.load(idx)
            arr = apply_plan(img, plan_crop(img.size[0], img.size[1], S, "center", False, (0.5, 0.5, 0.5, 0.5)))
            return idx, torch.from_numpy(np.array(arr)), True                   # own, writable copy
        except Exception:                                           # corrupt image: counted, label -1
            return idx, torch.zeros(S, S, 3, dtype=torch.uint8), False


def code_dtype(codebook_size: int):
    return np.int16 if codebook_size <= 32768 else np.int32


def extract_codes(tokenizer, data, out: str, *, loader: str = "auto", flip: bool = False, batch_size: int = 64,
                  num_workers: int = 2, device: str = "auto", overwrite: bool = False, env=None,
                  quiet: bool = False) -> dict:
    """Encode every image of ``data`` with ``tokenizer`` (a path or a Tokenizer) into ``out``; returns meta."""
    from dar_fast.training import distributed as D
    from dar_fast.training.data import LOADERS, ArraySource, open_source
    own_env = env is None
    if own_env:
        env = D.init_distributed(device)
    try:
        if loader not in LOADERS:
            raise ValueError(f"unknown loader {loader!r}; choose one of {', '.join(LOADERS)}")
        if batch_size <= 0:
            raise ValueError(f"--batch-size must be positive, got {batch_size}")
        log = D.RankLog(env, 0, quiet=quiet)
        if isinstance(tokenizer, (str, os.PathLike)):
            from dar_fast.api import load_tokenizer
            tok = load_tokenizer(os.fspath(tokenizer), device=env.device)
            tok_name = os.fspath(tokenizer)
        else:
            tok, tok_name = tokenizer.to(env.device).eval(), None
        H, W = tok.image_size
        if H != W:
            raise ValueError(f"extract-codes needs a square tokenizer, this one is {H}x{W}")
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
            raise ValueError(str(e)) from e
        if loader == "memory" and not isinstance(source, ArraySource):
            raise ValueError("loader='memory' takes in-memory arrays ('digits'); use 'torch' or 'dali' for files")
        if loader == "dali":
            log.info("extract-codes: decoding with the reference PIL recipe in data-set order (the DALI pipeline "
                     "streams in shuffled order); --loader dali only changes nothing here")
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
        lo, hi = env.rank * M // env.world_size, (env.rank + 1) * M // env.world_size
        mine = np.arange(lo, hi)
        codes_mm = np.load(codes_tmp, mmap_mode="r+")
        labels_mm = np.load(labels_tmp, mmap_mode="r+")
        all_labels = np.asarray(source.labels, dtype=np.int64)
        workers = 0 if isinstance(source, ArraySource) or num_workers <= 0 else int(num_workers)
        dl = torch.utils.data.DataLoader(_OrderedImages(source, H, mine), batch_size=batch_size, shuffle=False,
                                         num_workers=workers, pin_memory=env.device.type == "cuda")
        skipped, cmin, cmax = 0, None, None
        t0 = time.perf_counter()
        done = 0
        for idx, imgs, good in dl:
            idx = idx.numpy()
            x = imgs.to(env.device).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)    # uint8 -> [-1, 1]
            with torch.no_grad():
                c = [tok.encode(x)]
                if flip:
                    c.append(tok.encode(x.flip(-1)))
            c = torch.stack(c, dim=1).cpu().numpy()                                      # (b, A, N)
            g = good.numpy()
            lab = np.where(g, all_labels[idx], -1)
            skipped += int((~g).sum())
            if g.any():
                cg = c[g]
                cmin = int(cg.min()) if cmin is None else min(cmin, int(cg.min()))
                cmax = int(cg.max()) if cmax is None else max(cmax, int(cg.max()))
            codes_mm[idx] = c.astype(dtype)
            labels_mm[idx] = lab
            done += len(idx)
        codes_mm.flush()
        labels_mm.flush()
        del codes_mm, labels_mm
        dt = time.perf_counter() - t0
        stats = D.all_gather_object(dict(skipped=skipped, cmin=cmin, cmax=cmax, n=done, s=dt), env)
        D.barrier(env)
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
                        seconds=max(s["s"] for s in stats))
            os.replace(codes_tmp, os.path.join(out, CODES_NAME))
            os.replace(labels_tmp, os.path.join(out, LABELS_NAME))
            tmp = os.path.join(out, META_NAME + ".tmp")
            with open(tmp, "w") as f:
                json.dump(meta, f, indent=1)
            os.replace(tmp, os.path.join(out, META_NAME))
            log.info(f"extract-codes: {M} images x {A} -> {out} ({N} tokens, {meta['dtype']}, "
                     f"{M * A / max(meta['seconds'], 1e-9):.1f} img/s, {meta['skipped']} skipped)")
        meta = D.broadcast_object(meta, env)
        D.barrier(env)
        return meta
    finally:
        if own_env:
            D.shutdown(env)
