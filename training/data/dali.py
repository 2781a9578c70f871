"""The DALI backend: NVIDIA DALI (``pip install nvidia-dali-cuda130``) fed with encoded bytes through
``fn.external_source`` in OUR order; decode on the GPU ("mixed") when the requested device is CUDA, else on the
CPU; resize, crop, flip and CHW layout in DALI.

The geometry (resized size, crop window, flip) is computed on the host from the image header with the same
recipe (`transforms.plan_crop`), so crops are identical to the torch path; the pixels differ by resampling
only: DALI resizes in one antialiased-cubic step instead of BOX halvings then bicubic (measured on the test
images: mean |diff| ~1 level of 255). We chose this over resizing with PIL on the host because the host
resize is what DALI is there to remove.

Corrupt data: the host rejects bytes whose magic number or header does not parse before DALI sees them; if
DALI still raises (a truncated body, say), every batch it had in flight is decoded one by one with PIL
instead, the undecodable samples are dropped and counted, and a fresh pipeline continues after them. JPEGs
that libjpeg accepts but PIL rejects (some truncated files) can therefore be kept by DALI and skipped by
torch: only then do the two backends' orders differ.
"""
from __future__ import annotations

import collections
import concurrent.futures
import io
import warnings
import weakref

import numpy as np
import torch
from PIL import Image

from dar_fast.errors import MissingPackage, UsageError

from .sources import _EncodedSource, _looks_like_image
from .transforms import Decoder

__all__ = ["DALI_PIP_PACKAGE", "dali_available", "check_dali", "dali_chunks"]

DALI_PIP_PACKAGE = "nvidia-dali-cuda130"
DALI_HINT = (f"NVIDIA DALI is not installed: `pip install {DALI_PIP_PACKAGE}` (CUDA 13 wheel; it also runs "
             "on the CPU; nvidia-dali-cuda120 for CUDA 12), or use loader='torch'")

# Live DALI pipelines of this process: forking DataLoader workers while DALI threads run crashes the workers.
LIVE_PIPELINES = weakref.WeakSet()


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except ImportError:
        return False


def check_dali(source, device: torch.device) -> None:
    """The DALI backend's preconditions: encoded files, DALI importable, CUDA present when asked for."""
    if not isinstance(source, _EncodedSource):
        raise UsageError("loader='dali' decodes encoded image files; use loader='memory' for in-memory arrays")
    if not dali_available():
        raise MissingPackage(DALI_HINT)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} requested but CUDA is not available")


def _host_read(decoder: Decoder, epoch: int, idx: int):
    """Host side of one DALI sample: (bytes, crop plan), or None when the bytes are not a readable image."""
    try:
        data = decoder.source.read_bytes(idx)
        if not _looks_like_image(data):
            return None
        w, h = Image.open(io.BytesIO(data)).size            # header only
        return data, decoder.plan(w, h, epoch, idx)
    except Exception:
        return None


def _dali_pipeline(stream, inflight, decoder, batch_size, num_threads, device, pool, bad_limit, where):
    from nvidia.dali import fn, pipeline_def, types

    S, gpu, fatal = decoder.image_size, device.type == "cuda", []

    def source():
        """Next chunk: at least one readable sample (unreadable positions ride along, marked corrupt)."""
        keys, reads = [], []
        while not any(r is not None for r in reads):
            try:
                new = next(stream)
            except StopIteration:        # a finite stream (the ordered pass) ends: DALI stops after the
                if keys:                 # batches in flight; trailing unreadable positions ride along
                    inflight.append((keys, reads))
                raise
            keys += new
            reads += list(pool.map(lambda k: _host_read(decoder, k[0], k[2]), new))
            if len(keys) > bad_limit:
                fatal.append(RuntimeError(f"no readable image in {len(keys)} consecutive samples of {where}"))
                raise fatal[-1]
        inflight.append((keys, reads))
        good = [r for r in reads if r is not None]
        return ([np.frombuffer(d, np.uint8) for d, _ in good],
                [np.array([p.size[1], p.size[0]], np.float32) for _, p in good],     # (h, w)
                [np.array([p.offset[1], p.offset[0]], np.int32) for _, p in good],   # (y, x)
                [np.array(int(p.flip), np.int32) for _, p in good])

    device_id = (device.index if device.index is not None else torch.cuda.current_device()) if gpu else None

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, prefetch_queue_depth=2)
    def pipe():
        enc, size, anchor, mirror = fn.external_source(source=source, num_outputs=4, batch=True)
        img = fn.decoders.image(enc, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                adjust_orientation=False)                  # PIL ignores EXIF orientation too
        img = fn.resize(img, size=size, interp_type=types.INTERP_CUBIC, antialias=True, dtype=types.UINT8)
        img = fn.slice(img, anchor, types.Constant(np.array([S, S], np.int32)), axes=[0, 1],
                       normalized_anchor=False, normalized_shape=False)
        return fn.crop_mirror_normalize(img, mirror=mirror, dtype=types.UINT8, output_layout="CHW")

    p = pipe()
    p.build()
    LIVE_PIPELINES.add(p)
    return p, fatal


def _dali_to_torch(out, device: torch.device) -> torch.Tensor:
    t = out.as_tensor()
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray
        dst = torch.empty(t.shape(), dtype=torch.uint8, device=device)
        feed_ndarray(t, dst, cuda_stream=torch.cuda.current_stream(device))
        return dst
    return torch.from_numpy(np.array(t))


def dali_chunks(shard, decoder, batch_size, num_workers, device, bad_limit, where, epoch, j):
    """DALI chunks from (epoch, j), endless for a ``Sharding`` and until the stream ends for a finite one
    (``OrderedSharding``); on a DALI error the batches in flight are decoded with PIL and a fresh pipeline
    continues after them."""
    pool = concurrent.futures.ThreadPoolExecutor(max(1, num_workers))
    ever_ok = False
    try:
        while True:
            inflight = collections.deque()
            pipe, fatal = _dali_pipeline(shard.chunks(epoch, j, batch_size), inflight, decoder, batch_size,
                                         max(1, num_workers), device, pool, bad_limit, where)
            try:
                while True:
                    try:
                        (out,) = pipe.run()
                    except StopIteration:            # finite stream exhausted (StopIteration is an Exception)
                        for keys, _ in inflight:     # only trailing positions without a readable image
                            yield None, [(e, jj, i, -1) for e, jj, i in keys]
                        return
                    keys, reads = inflight.popleft()
                    images = _dali_to_torch(out, device)
                    ever_ok = True
                    metas, row = [], 0
                    for (e, jj, i), r in zip(keys, reads):
                        metas.append((e, jj, i, -1 if r is None else row))
                        row += r is not None
                    yield images, metas
            except Exception as err:
                if fatal:
                    raise fatal[0] from None
                if not inflight:
                    raise
                failure = err
            finally:
                del pipe
            # Which in-flight batch failed is not reliably known with prefetching: decode all of them with PIL,
            # one by one, then go on with a fresh pipeline after the last of them.
            fallback = [decoder.__getitems__(keys) for keys, _ in inflight]
            if device.type == "cuda":           # on the device like the DALI chunks: a batch may mix both
                fallback = [(None if x is None else x.to(device), metas) for x, metas in fallback]
            n_bad = sum(r < 0 for _, metas in fallback for *_, r in metas)
            first_line = (str(failure).strip().splitlines() or [type(failure).__name__])[0][:200]
            if not ever_ok and n_bad == 0:     # not the data's fault: a broken DALI set-up must fail loudly
                raise RuntimeError(f"the DALI pipeline fails on images that PIL decodes ({first_line}); "
                                   f"use loader='torch'") from failure
            warnings.warn(f"DALI failed on a batch ({first_line}); decoded the {len(fallback)} batch(es) in "
                          f"flight with PIL instead ({n_bad} undecodable sample(s) skipped)")
            yield from fallback
            epoch, j, _ = inflight[-1][0][-1]
            epoch, j = shard.next_position(epoch, j)
    finally:
        pool.shutdown(wait=False)
