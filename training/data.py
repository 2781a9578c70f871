"""Training input pipelines: DALI, a torch DataLoader fallback and in-memory arrays, under one contract.

Every loader is an infinite iterator of

    images  float32 (B, 3, S, S) in [-1, 1] on the requested device
    labels  int64   (B,)

with B the per-rank batch size. What a rank sees is a pure function of (seed, rank, world_size, batch_size,
drop_last) and of the data: the worker count, the backend and the device change nothing but decoder rounding.

Order. Epoch e is ``torch.randperm(N)`` from a generator seeded by (seed, e). The epoch uses its first
``(N // (B * world)) * B * world`` positions (drop_last; with ``drop_last=False`` the permutation is padded
from its own start to a multiple of B * world, as DistributedSampler pads) and rank r takes positions
r::world of them, so ranks are disjoint. A rank reads its positions as one endless stream across epochs; a
batch is the next B *decodable* samples of that stream: a corrupt image is skipped, counted in ``skipped``,
and the batch is refilled from the next positions, so batches keep their size and may straddle an epoch
boundary. ``state_dict()`` records the stream position just after the last sample handed out (``epoch``,
``index`` = positions of this rank's epoch consumed, corrupt ones included); ``load_state_dict`` continues
at exactly the next batch.

Augmentation (per sample, from (seed, epoch, dataset index) only, so neither the worker count nor the rank
count changes it):
- "center": the ADM / LlamaGen ``center_crop_arr``: halve with BOX while the short side >= 2*S, BICUBIC
  resize so the short side is S (``round`` on both sides, as the reference does), centre crop S x S.
  ``flip=True`` adds a horizontal flip with p = 0.5.
- "random_crop_flip": LlamaGen's ``random_crop_arr`` (crop fraction in [0.8, 1.0]): short side T drawn
  uniformly from [ceil(S / 1.0), ceil(S / 0.8)], the same BOX halving while the short side >= 2*T, BICUBIC
  resize to short side T, a uniformly placed S x S crop, then a horizontal flip with p = 0.5.

Backends.
- "torch": ``torch.utils.data.DataLoader`` workers decode with PIL and apply the recipe above exactly.
  This is the reference.
- "dali": NVIDIA DALI (``pip install nvidia-dali-cuda130``) fed with encoded bytes through
  ``fn.external_source`` in OUR order; decode on the GPU ("mixed") when the requested device is CUDA, else
  on the CPU; resize, crop, flip and CHW layout in DALI. The geometry (resized size, crop window, flip) is
  computed on the host from the image header with the same recipe, so crops are identical to the torch
  path; the pixels differ by resampling only: DALI resizes in one antialiased-cubic step instead of BOX
  halvings then bicubic (measured on the test images: mean |diff| ~1 level of 255). We chose this over
  resizing with PIL on the host because the host resize is what DALI is there to remove.
  Corrupt data: the host rejects bytes whose magic number or header does not parse before DALI sees them;
  if DALI still raises (a truncated body, say), every batch it had in flight is decoded one by one with PIL
  instead, the undecodable samples are dropped and counted, and a fresh pipeline continues after them.
  JPEGs that libjpeg accepts but PIL rejects (some truncated files) can therefore be kept by DALI and
  skipped by torch: only then do the two backends' orders differ.
- "memory": arrays in this process (``ArraySource``, "digits"); no workers.

One ordered pass (``make_ordered_loader``, for tokenizing a data set once): a finite iterator of

    images  float32 (B, 3, S, S) in [-1, 1] on the requested device
    labels  int64   (B,) on the requested device
    indices int64   (B,) on the CPU: the data-set index of every row

over this rank's contiguous block ``[r*N//W, (r+1)*N//W)`` of the data set, every index exactly once, in
increasing order; the ADM centre crop with no random augmentation (``flip=True`` mirrors every image); batches
are the next B decodable images (corrupt ones are skipped, counted in ``skipped`` and listed in ``corrupt``)
and the last batch holds what is left. The same backends decode it, so the DALI pass differs from the torch
(PIL) pass by resampling only, as above.

Sources: an ImageFolder tree, webdataset ``.tar`` shards (a directory of them, one path, a brace pattern
``shard-{000..009}.tar`` or a list), an ``ArraySource``, or "digits" / "digits:train" / "digits:holdout"
(scikit-learn's bundled digits, no network).
"""
from __future__ import annotations

import collections
import concurrent.futures
import functools
import io
import json
import math
import os
import re
import stat
import tarfile
import warnings
import weakref
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from dar_fast.seeding import splitmix64

__all__ = [
    "IMG_EXTENSIONS", "AUGMENTS", "LOADERS", "DALI_PIP_PACKAGE",
    "ArraySource", "FolderSource", "TarSource", "open_source",
    "load_digits_arrays", "digits_split",
    "split_global_batch", "epoch_permutation", "sample_uniforms", "CropPlan", "plan_crop", "apply_plan",
    "dali_available", "make_loader", "MemoryLoader", "TorchLoader", "DaliLoader",
    "shard_bounds", "make_ordered_loader", "OrderedLoader",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp")
TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")          # webdataset image fields, in order of preference
TAR_LABEL_EXTS = ("cls", "json", "txt")                   # webdataset label fields, in order of preference
AUGMENTS = ("center", "random_crop_flip")
LOADERS = ("auto", "dali", "torch", "memory")
DALI_PIP_PACKAGE = "nvidia-dali-cuda130"
_DALI_HINT = (f"NVIDIA DALI is not installed: `pip install {DALI_PIP_PACKAGE}` (CUDA 13 wheel; it also runs "
              "on the CPU; nvidia-dali-cuda120 for CUDA 12), or use loader='torch'")
_MIN_CROP_FRAC, _MAX_CROP_FRAC = 0.8, 1.0                  # LlamaGen random_crop_arr defaults


# ====================================================================================== sources

def _looks_like_image(data: bytes) -> bool:
    """Cheap magic-number check for the formats both PIL and DALI decode."""
    head = data[:12]
    return (head[:3] == b"\xff\xd8\xff"                      # JPEG
            or head[:8] == b"\x89PNG\r\n\x1a\n"              # PNG
            or head[:2] == b"BM"                             # BMP
            or head[:4] in (b"II*\x00", b"MM\x00*")          # TIFF
            or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
            or (len(head) >= 2 and head[0:1] == b"P" and head[1:2] in b"123456"))  # PNM


class ArraySource:
    """Images held in memory: uint8 (N, H, W, 3|1) / (N, H, W), or float in ``value_range`` (quantised to uint8
    once, here, since every backend works on 8-bit images); labels int (N,)."""

    kind = "array"

    def __init__(self, images, labels, classes: Optional[Sequence[str]] = None,
                 value_range: Tuple[float, float] = (0.0, 1.0)):
        images = np.asarray(images.detach().cpu() if torch.is_tensor(images) else images)
        labels = np.asarray(labels.detach().cpu() if torch.is_tensor(labels) else labels)
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"ArraySource: images must be (N, H, W, 3), (N, H, W, 1) or (N, H, W) channels-last, "
                             f"got shape {tuple(images.shape)}")
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        if images.dtype != np.uint8:
            if not np.issubdtype(images.dtype, np.floating):
                raise ValueError(f"ArraySource: images must be uint8 or float, got {images.dtype}")
            lo, hi = value_range
            images = np.clip(np.rint((images.astype(np.float64) - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
        if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"ArraySource: labels must be integers of shape ({images.shape[0]},), "
                             f"got {labels.dtype} {tuple(labels.shape)}")
        if images.shape[0] == 0:
            raise ValueError("ArraySource: no images")
        if labels.min() < 0:
            raise ValueError("ArraySource: labels must be >= 0")
        self.images = np.ascontiguousarray(images)
        self.labels = labels.astype(np.int64)
        n_cls = int(self.labels.max()) + 1
        self.classes = list(classes) if classes is not None else [str(i) for i in range(n_cls)]
        if len(self.classes) < n_cls:
            raise ValueError(f"ArraySource: {len(self.classes)} class names for label ids up to {n_cls - 1}")

    def __len__(self):
        return len(self.labels)

    def load(self, idx: int) -> Image.Image:
        return Image.fromarray(self.images[idx])


class _EncodedSource:
    """A source of encoded image files: ``read_bytes(idx)`` and ``load(idx)`` (PIL, RGB)."""

    labels: np.ndarray
    classes: List[str]

    def __len__(self):
        return len(self.labels)

    def read_bytes(self, idx: int) -> bytes:
        raise NotImplementedError

    def load(self, idx: int) -> Image.Image:
        data = self.read_bytes(idx)
        if not _looks_like_image(data):
            raise ValueError("not an image (magic bytes)")
        img = Image.open(io.BytesIO(data))
        return img.convert("RGB")


class FolderSource(_EncodedSource):
    """An ImageFolder tree: ``root/<class>/**/<image>``; sorted class names -> label ids 0..C-1."""

    kind = "folder"

    def __init__(self, root: str):
        root = os.fspath(root)
        if not os.path.exists(root):
            raise FileNotFoundError(f"data directory not found: {root}")
        if not os.path.isdir(root):
            raise NotADirectoryError(f"data source is not a directory: {root}")
        try:
            entries = sorted(os.scandir(root), key=lambda e: e.name)
        except PermissionError as e:
            raise PermissionError(f"cannot read data directory {root}: {e.strerror}") from e
        class_dirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
        if not class_dirs:
            loose = [e.name for e in entries if e.name.lower().endswith(IMG_EXTENSIONS)]
            if loose:
                raise ValueError(f"{root} holds images but no class sub-directories; the ImageFolder layout is "
                                 f"root/<class>/<image> (found e.g. {loose[0]})")
            raise ValueError(f"data directory is empty (no class sub-directories): {root}")
        self.root = root
        self.classes = [e.name for e in class_dirs]
        paths, labels = [], []
        self.skipped_files: List[str] = []      # image-named entries that are not regular files (FIFOs, sockets,
        #                                        devices, dangling links): listed here, never opened
        visited = {os.path.realpath(root)}      # shared: a real directory is entered once in the whole tree
        for label, d in enumerate(class_dirs):
            for path in _walk_images(d.path, self.skipped_files, visited):
                paths.append(path)
                labels.append(label)
        if self.skipped_files:
            warnings.warn(f"{root}: skipped {len(self.skipped_files)} image-named entr"
                          f"{'y' if len(self.skipped_files) == 1 else 'ies'} that are not regular files "
                          f"(e.g. {self.skipped_files[0]})", stacklevel=2)
        if not paths:
            raise ValueError(f"no images under {root} (looked for {', '.join(IMG_EXTENSIONS)} in "
                             f"{len(class_dirs)} class directories)")
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)

    def read_bytes(self, idx: int) -> bytes:
        return read_regular_file(self.paths[idx])


def read_regular_file(path: str) -> bytes:
    """The bytes of a regular file. Opened non-blocking and checked with fstat before reading, so a FIFO or a
    device that took an image's name after the listing raises OSError at once instead of blocking the loader
    forever. (A read stuck on a hung network file system cannot be interrupted from Python; it is not covered.)"""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def _walk_images(top: str, skipped: List[str], visited: set) -> List[str]:
    """Image files under `top` in os.walk's order (directories sorted by path, files by name), following
    directory symlinks once each: a directory whose real path was already visited (a symlink loop, or two
    links to one tree) is not entered again. `visited` (real paths) is shared with the caller's other walks."""
    per_dir = []

    def visit(d: str):
        real = os.path.realpath(d)
        if real in visited:
            return
        visited.add(real)
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except PermissionError as e:
            raise PermissionError(f"cannot read class directory {d}: {e.strerror}") from e
        subdirs, files = [], []
        for e in entries:
            try:
                is_dir = e.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                subdirs.append(e.path)
                continue
            if not e.name.lower().endswith(IMG_EXTENSIONS):
                continue
            try:
                regular = e.is_file(follow_symlinks=True) and stat.S_ISREG(os.stat(e.path).st_mode)
            except OSError:             # a dangling or looping link
                regular = False
            if regular:
                files.append(e.path)
            else:
                skipped.append(e.path)
        per_dir.append((d, files))
        for sd in subdirs:
            visit(sd)

    visit(top)
    return [f for _, files in sorted(per_dir, key=lambda t: t[0]) for f in files]


def _raise(e):
    raise e


def _expand_braces(pattern: str) -> List[str]:
    """webdataset-style ``a{000..012}b`` (zero padding kept) and ``{x,y}`` expansion."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = r.group(1), r.group(2)
        items = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [p for it in items for p in _expand_braces(head + it + tail)]


def _parse_label(ext: str, raw: bytes):
    text = raw.decode("utf-8").strip()
    if ext == "json":
        val = json.loads(text)
        if isinstance(val, dict):
            for k in ("label", "cls", "class", "class_id", "target"):
                if k in val:
                    val = val[k]
                    break
            else:
                raise ValueError(f"json label has none of the keys label/cls/class/class_id/target: {text[:80]}")
        return val
    if ext == "cls":
        return int(text)
    try:                                   # txt: an integer id or a class name
        return int(text)
    except ValueError:
        return text


class TarSource(_EncodedSource):
    """webdataset ``.tar`` shards (uncompressed). A sample is the members sharing a key (the path up to the first
    dot of the basename): its image is the first of jpg/jpeg/png/webp present, its label the first of
    cls/json/txt (an integer id, or a class name mapped to ids by sorted name). Shards with no labels at all
    give label 0 for every sample. Image members are read in place with ``os.pread`` (no extraction)."""

    kind = "tar"

    def __init__(self, shards: Sequence[str]):
        shards = [os.fspath(s) for s in shards]
        if not shards:
            raise ValueError("no .tar shards given")
        for s in shards:
            if not os.path.isfile(s):
                raise FileNotFoundError(f"tar shard not found: {s}")
        self.shards = shards
        shard_of, offsets, sizes, raw_labels = [], [], [], []
        for si, path in enumerate(shards):
            try:
                tf = tarfile.open(path, "r:")
            except tarfile.ReadError as e:
                raise ValueError(f"cannot read {path} as an uncompressed tar shard: {e}") from e
            samples = collections.OrderedDict()   # key -> {"img": (ext, offset, size), "label": value}
            with tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    dirname, base = os.path.split(m.name)
                    stem, dot, ext = base.partition(".")
                    if not dot or not stem:
                        continue
                    ext = ext.lower()
                    rec = samples.setdefault(dirname + "/" + stem, {})
                    if ext in TAR_IMAGE_EXTS:
                        prev = rec.get("img")
                        if prev is None or TAR_IMAGE_EXTS.index(ext) < TAR_IMAGE_EXTS.index(prev[0]):
                            rec["img"] = (ext, m.offset_data, m.size)
                    elif ext in TAR_LABEL_EXTS:
                        prev = rec.get("label")
                        if prev is None or TAR_LABEL_EXTS.index(ext) < TAR_LABEL_EXTS.index(prev[0]):
                            try:
                                rec["label"] = (ext, _parse_label(ext, tf.extractfile(m).read()))
                            except (ValueError, UnicodeDecodeError) as e:
                                raise ValueError(f"{path}: bad label in member {m.name}: {e}") from e
            for key, rec in samples.items():
                if "img" not in rec:
                    continue
                shard_of.append(si)
                offsets.append(rec["img"][1])
                sizes.append(rec["img"][2])
                raw_labels.append(rec["label"][1] if "label" in rec else None)
        if not offsets:
            raise ValueError(f"no images ({'/'.join(TAR_IMAGE_EXTS)}) in {len(shards)} tar shard(s), e.g. {shards[0]}")
        have = [v is not None for v in raw_labels]
        if not any(have):
            self.labels = np.zeros(len(raw_labels), dtype=np.int64)
            self.classes = ["0"]
        elif not all(have):
            raise ValueError(f"{have.count(False)} of {len(have)} tar samples have no cls/json/txt label")
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in raw_labels):
            self.labels = np.asarray(raw_labels, dtype=np.int64)
            if self.labels.min() < 0:
                raise ValueError("tar labels must be >= 0")
            self.classes = [str(i) for i in range(int(self.labels.max()) + 1)]
        elif all(isinstance(v, str) for v in raw_labels):
            self.classes = sorted(set(raw_labels))
            ids = {c: i for i, c in enumerate(self.classes)}
            self.labels = np.asarray([ids[v] for v in raw_labels], dtype=np.int64)
        else:
            raise ValueError("tar labels mix integer ids and class names")
        self.shard_of = np.asarray(shard_of, dtype=np.int32)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self._fds = {}

    def read_bytes(self, idx: int) -> bytes:
        s = int(self.shard_of[idx])
        fd = self._fds.get(s)
        if fd is None:            # pread has no file position, so one fd serves threads and forked workers
            fd = self._fds[s] = os.open(self.shards[s], os.O_RDONLY)
        return os.pread(fd, int(self.sizes[idx]), int(self.offsets[idx]))

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_fds"] = {}
        return d

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass


Source = Union[str, os.PathLike, Sequence[str], ArraySource, FolderSource, TarSource]


def open_source(source: Source):
    """Resolve ``source`` to an ArraySource, FolderSource or TarSource (see the module docstring)."""
    if isinstance(source, (ArraySource, FolderSource, TarSource)):
        return source
    if isinstance(source, (list, tuple)):
        paths = [p for s in source for p in _expand_braces(os.fspath(s))]
        bad = [p for p in paths if not p.endswith(".tar")]
        if bad:
            raise ValueError(f"a list source must name .tar shards, got {bad[0]}")
        return TarSource(paths)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"unsupported data source of type {type(source).__name__}")
    s = os.fspath(source)
    if s in ("digits", "digits:train", "digits:holdout"):
        if s == "digits":
            images, labels = load_digits_arrays()
        else:
            (ti, tl), (hi, hl) = digits_split()
            images, labels = (ti, tl) if s.endswith("train") else (hi, hl)
        return ArraySource(images, labels)
    if "{" in s:
        return TarSource(_expand_braces(s))
    if s.endswith(".tar") and not os.path.isdir(s):
        return TarSource([s])
    if os.path.isdir(s):
        try:
            tars = sorted(e.path for e in os.scandir(s) if e.is_file() and e.name.endswith(".tar"))
        except PermissionError as e:
            raise PermissionError(f"cannot read data directory {s}: {e.strerror}") from e
        if tars:
            return TarSource(tars)
    return FolderSource(s)


# ====================================================================================== digits

def load_digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits as images uint8 (1797, 32, 32, 3) and labels int64 (1797,).

    Intensity 0..16 -> round(v * 255 / 16) (ink bright on black), 4x nearest-neighbour upsampling, the same
    value in all three channels. No network: the data ship with scikit-learn."""
    img, labels = _digits_cached()
    return img.copy(), labels.copy()


@functools.lru_cache(maxsize=1)
def _digits_cached():           # importing scikit-learn takes ~1.5 s: do it once per process
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits data set needs scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    img = np.rint(d.images.astype(np.float64) * (255.0 / 16.0)).astype(np.uint8)       # (N, 8, 8)
    img = img.repeat(4, axis=1).repeat(4, axis=2)                                       # (N, 32, 32)
    img = np.ascontiguousarray(np.repeat(img[..., None], 3, axis=-1))                   # (N, 32, 32, 3)
    return img, d.target.astype(np.int64)


def digits_split(holdout_fraction: float = 0.1, seed: int = 0):
    """Deterministic stratified split of ``load_digits_arrays()``:
    ``((train_images, train_labels), (holdout_images, holdout_labels))``; each class gives
    ``round(n_class * holdout_fraction)`` images to the holdout; both parts keep the original order."""
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    images, labels = load_digits_arrays()
    rng = np.random.default_rng(seed)
    hold = np.zeros(len(labels), dtype=bool)
    for c in range(int(labels.max()) + 1):
        members = np.flatnonzero(labels == c)
        k = int(round(len(members) * holdout_fraction))
        hold[rng.permutation(members)[:k]] = True
    return (images[~hold], labels[~hold]), (images[hold], labels[hold])


# ====================================================================================== order and augmentation

def split_global_batch(global_batch: int, world_size: int) -> int:
    """Per-rank batch size for ``global_batch`` over ``world_size`` ranks; a clear error if it does not divide."""
    if int(global_batch) != global_batch or global_batch <= 0:
        raise ValueError(f"global batch size must be a positive integer, got {global_batch}")
    if int(world_size) != world_size or world_size <= 0:
        raise ValueError(f"world size must be a positive integer, got {world_size}")
    if global_batch % world_size:
        raise ValueError(f"global batch size {global_batch} is not divisible by the world size {world_size} "
                         f"(each rank needs the same batch); use a multiple of {world_size}, e.g. "
                         f"{(global_batch // world_size + 1) * world_size}")
    return global_batch // world_size


_M64 = (1 << 64) - 1


def _key(seed: int, epoch: int, idx: int = 0) -> int:
    return splitmix64(splitmix64(splitmix64(seed & _M64) ^ (epoch & _M64)) ^ (idx & _M64))


def sample_uniforms(seed: int, epoch: int, idx: int, n: int = 4) -> List[float]:
    """``n`` uniforms in [0, 1) that depend on (seed, epoch, dataset index) only (splitmix64 counter hash)."""
    h, out = _key(seed, epoch, idx), []
    for _ in range(n):
        h = splitmix64(h)
        out.append((h >> 11) * (1.0 / (1 << 53)))
    return out


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The epoch's permutation of ``range(n)`` (int64), from a torch.Generator seeded by (seed, epoch)."""
    g = torch.Generator()
    g.manual_seed(_key(seed, epoch) & ((1 << 63) - 1))
    return torch.randperm(n, generator=g)


@dataclass(frozen=True)
class CropPlan:
    """Geometry of one sample: ``halvings`` BOX halvings, BICUBIC resize to ``size`` (w, h), crop at
    ``offset`` (x, y) of ``crop`` x ``crop``, then an optional horizontal flip."""
    halvings: int
    size: Tuple[int, int]
    offset: Tuple[int, int]
    crop: int
    flip: bool


def plan_crop(w: int, h: int, image_size: int, augment: str, flip: bool, u: Sequence[float]) -> CropPlan:
    """The crop of an image of ``w`` x ``h`` for uniforms ``u`` = (short side, y, x, flip), following
    ADM's ``center_crop_arr`` / LlamaGen's ``random_crop_arr`` operation for operation."""
    S = image_size
    if augment == "center":
        T = S
    else:
        lo, hi = math.ceil(S / _MAX_CROP_FRAC), math.ceil(S / _MIN_CROP_FRAC)
        T = lo + min(int(u[0] * (hi - lo + 1)), hi - lo)
    k = 0
    while min(w, h) >= 2 * T:
        w, h, k = w // 2, h // 2, k + 1
    scale = T / min(w, h)
    rw, rh = round(w * scale), round(h * scale)
    if augment == "center":
        x0, y0, do_flip = (rw - S) // 2, (rh - S) // 2, bool(flip) and u[3] < 0.5
    else:
        y0 = min(int(u[1] * (rh - S + 1)), rh - S)
        x0 = min(int(u[2] * (rw - S + 1)), rw - S)
        do_flip = u[3] < 0.5
    return CropPlan(k, (rw, rh), (x0, y0), S, do_flip)


def apply_plan(img: Image.Image, plan: CropPlan) -> np.ndarray:
    """Apply ``plan`` to an RGB PIL image -> uint8 (S, S, 3)."""
    for _ in range(plan.halvings):
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.BOX)
    img = img.resize(plan.size, resample=Image.BICUBIC)
    x0, y0 = plan.offset
    arr = np.asarray(img)[y0:y0 + plan.crop, x0:x0 + plan.crop]
    if plan.flip:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(arr)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except ImportError:
        return False


# ====================================================================================== the per-rank stream

class _Sharding:
    """Which dataset index a rank reads at (epoch, j), j < per_rank."""

    def __init__(self, n, batch_size, rank, world_size, seed, drop_last):
        self.n, self.rank, self.world, self.seed = n, rank, world_size, seed
        step = batch_size * world_size
        if drop_last:
            if n < step:
                raise ValueError(f"the data set has {n} samples, fewer than one global batch "
                                 f"({batch_size} x {world_size} ranks = {step}); lower the batch size or "
                                 f"pass drop_last=False")
            used = (n // step) * step
        else:
            used = -(-n // step) * step
        self.per_rank = used // world_size
        self._perm_epoch, self._perm = None, None

    def index(self, epoch: int, j: int) -> int:
        if self._perm_epoch != epoch:
            self._perm, self._perm_epoch = epoch_permutation(self.seed, epoch, self.n).numpy(), epoch
        return int(self._perm[(self.rank + j * self.world) % self.n])

    def positions(self, epoch: int, j: int):
        """Endless (epoch, j, idx) from (epoch, j) on."""
        while True:
            yield epoch, j, self.index(epoch, j)
            j += 1
            if j == self.per_rank:
                epoch, j = epoch + 1, 0

    def chunks(self, epoch: int, j: int, size: int):
        """Endless lists of ``size`` consecutive (epoch, j, idx)."""
        it = self.positions(epoch, j)
        while True:
            yield [next(it) for _ in range(size)]


# A chunk: (images uint8 (n_good, 3, S, S) or None, [(epoch, j, idx, row)]) with row -1 for a corrupt sample.
Chunk = Tuple[Optional[torch.Tensor], List[Tuple[int, int, int, int]]]


class _Decoder:
    """Decode + augment samples of a source with PIL (the reference recipe). Picklable: it is the Dataset of
    the torch backend's DataLoader workers and the fallback of the DALI backend."""

    def __init__(self, source, image_size, augment, flip, seed):
        self.source, self.image_size, self.augment, self.flip, self.seed = source, image_size, augment, flip, seed

    def plan(self, w: int, h: int, epoch: int, idx: int) -> CropPlan:
        return plan_crop(w, h, self.image_size, self.augment, self.flip, sample_uniforms(self.seed, epoch, idx))

    def decode(self, epoch: int, idx: int) -> Optional[np.ndarray]:
        try:
            img = self.source.load(idx)
            return apply_plan(img, self.plan(img.size[0], img.size[1], epoch, idx))
        except Exception:       # any decoder failure (OSError, SyntaxError, DecompressionBombError, ...) = corrupt
            return None

    def __len__(self):
        return len(self.source)

    def __getitems__(self, keys) -> Chunk:
        arrays, metas = [], []
        for epoch, j, idx in keys:
            a = self.decode(epoch, idx)
            metas.append((epoch, j, idx, -1 if a is None else len(arrays)))
            if a is not None:
                arrays.append(a)
        images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous() if arrays else None
        return images, metas

    def __getitem__(self, key):
        return self.__getitems__([key])


def _collate_chunk(chunk):
    return chunk


# ====================================================================================== loaders

class _Loader:
    """Batch assembly, resume state and the public attributes; a backend supplies ``_chunks(epoch, j)``."""

    backend = "?"

    def __init__(self, source, image_size, batch_size, rank, world_size, seed, augment, flip, device,
                 num_workers, drop_last):
        self.source = source
        self.image_size, self.batch_size = int(image_size), int(batch_size)
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.augment, self.flip, self.drop_last = augment, bool(flip), bool(drop_last)
        self.device = torch.device(device)
        self.num_workers = int(num_workers)
        self.num_samples = len(source)
        self.classes = list(source.classes)
        self.num_classes = len(self.classes)
        self._labels = source.labels
        self._shard = _Sharding(self.num_samples, self.batch_size, self.rank, self.world_size, self.seed,
                                self.drop_last)
        self.steps_per_epoch = self._shard.per_rank // self.batch_size
        self._decoder = _Decoder(source, self.image_size, augment, self.flip, self.seed)
        self.skipped = 0
        self._epoch, self._index = 0, 0
        self._pending = collections.deque()
        self._it = None

    # ---- iteration
    def __iter__(self):
        return self

    def __next__(self) -> Tuple[torch.Tensor, torch.Tensor]:
        B = self.batch_size
        if self._it is None:
            self._it = self._chunks(self._epoch, self._index)
        picks, last, bad_run = [], None, 0
        bad_limit = self.num_samples + self._shard.per_rank
        while len(picks) < B:
            if not self._pending:
                images, metas = next(self._it)
                self._pending.extend((e, j, i, images, r) for e, j, i, r in metas)
            epoch, j, idx, images, row = self._pending.popleft()
            last = (epoch, j)
            if row < 0:
                self.skipped += 1
                bad_run += 1
                if bad_run > bad_limit:
                    raise RuntimeError(f"no decodable image in {bad_run} consecutive samples of {self._where()}")
                continue
            bad_run = 0
            picks.append((images, row, idx))
        epoch, j = last
        self._epoch, self._index = (epoch + 1, 0) if j + 1 == self._shard.per_rank else (epoch, j + 1)
        first = picks[0][0]
        if all(t is first for t, _, _ in picks) and len(first) == B and [r for _, r, _ in picks] == list(range(B)):
            batch = first                                            # the common case: one whole chunk
        else:
            batch = torch.stack([t[r] for t, r, _ in picks])
        labels = torch.from_numpy(self._labels[np.fromiter((i for _, _, i in picks), np.int64, B)])
        nb = self.device.type == "cuda"
        images = batch.to(self.device, non_blocking=nb).float().div_(127.5).sub_(1.0)   # uint8 -> [-1, 1]
        return images, labels.to(self.device, non_blocking=nb)

    def _chunks(self, epoch: int, j: int) -> Iterable[Chunk]:
        raise NotImplementedError

    def indices(self, epoch: int) -> np.ndarray:
        """Dataset indices this rank reads in ``epoch``, in order (corrupt ones included)."""
        sh = self._shard
        pos = (sh.rank + np.arange(sh.per_rank, dtype=np.int64) * sh.world) % sh.n
        return epoch_permutation(self.seed, epoch, sh.n).numpy()[pos]

    def _where(self) -> str:
        return getattr(self.source, "root", None) or getattr(self.source, "shards", [type(self.source).__name__])[0]

    # ---- resume
    _ORDER_KEYS = ("seed", "world_size", "batch_size", "num_samples", "drop_last")

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "index": self._index, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "batch_size": self.batch_size, "num_samples": self.num_samples,
                "drop_last": self.drop_last, "skipped": self.skipped, "backend": self.backend,
                "augment": self.augment, "image_size": self.image_size}

    def load_state_dict(self, sd: dict) -> None:
        """Continue at the batch after the one ``sd`` was taken after. The order-defining settings must match
        (another rank's state is accepted: with no corrupt images every rank is at the same index)."""
        for k in self._ORDER_KEYS:
            if k in sd and sd[k] != getattr(self, k):
                raise ValueError(f"loader state was saved with {k}={sd[k]!r} but this loader has "
                                 f"{k}={getattr(self, k)!r}: the sample order would not continue")
        epoch, index = int(sd["epoch"]), int(sd["index"])
        if not 0 <= index < self._shard.per_rank or epoch < 0:
            raise ValueError(f"loader state position epoch={epoch} index={index} is out of range "
                             f"(0 <= index < {self._shard.per_rank})")
        self.close()
        self._epoch, self._index = epoch, index
        self.skipped = int(sd.get("skipped", 0))

    def close(self) -> None:
        """Stop workers / pipelines; iteration restarts from the saved position."""
        self._it = None
        self._pending.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        return (f"{type(self).__name__}(samples={self.num_samples}, classes={self.num_classes}, "
                f"batch={self.batch_size}, rank={self.rank}/{self.world_size}, size={self.image_size}, "
                f"augment={self.augment!r}, device={self.device})")


class MemoryLoader(_Loader):
    """In-process loader for ArraySource (no workers)."""

    backend = "memory"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        imgs = self.source.images
        S = self.image_size
        # Already S x S with a centre crop and no flip: every plan is the identity, so gather whole batches.
        self._identity = self.augment == "center" and not self.flip and imgs.shape[1:3] == (S, S)
        self._chw = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous() if self._identity else None

    def _chunks(self, epoch, j):
        for keys in self._shard.chunks(epoch, j, self.batch_size):
            if self._identity:
                idx = torch.tensor([k[2] for k in keys])
                yield self._chw.index_select(0, idx), [(e, jj, i, r) for r, (e, jj, i) in enumerate(keys)]
            else:
                yield self._decoder.__getitems__(keys)


class _ChunkSampler:
    """batch_sampler for DataLoader: endless chunks of (epoch, j, idx) from a start position."""

    def __init__(self, shard: _Sharding, epoch: int, j: int, size: int):
        self.shard, self.epoch, self.j, self.size = shard, epoch, j, size

    def __iter__(self):
        return self.shard.chunks(self.epoch, self.j, self.size)


class TorchLoader(_Loader):
    """torch.utils.data.DataLoader workers decoding with PIL (the reference recipe)."""

    backend = "torch"

    def _chunks(self, epoch, j):
        # Forked workers crash while DALI pipelines run threads in this process: start them from a clean
        # forkserver then (~3 s per start instead of ~0.1 s).
        ctx = "forkserver" if self.num_workers > 0 and len(_LIVE_DALI) else None
        dl = torch.utils.data.DataLoader(
            self._decoder, batch_sampler=_ChunkSampler(self._shard, epoch, j, self.batch_size),
            num_workers=self.num_workers, collate_fn=_collate_chunk, multiprocessing_context=ctx,
            pin_memory=self.device.type == "cuda", prefetch_factor=2 if self.num_workers > 0 else None)
        return iter(dl)

    def close(self):
        it = self._it
        super().close()
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


class DaliLoader(_Loader):
    """NVIDIA DALI decode/resize/crop/flip fed through external_source in our order (see the module docstring)."""

    backend = "dali"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        if not isinstance(self.source, _EncodedSource):
            raise ValueError("loader='dali' decodes encoded image files; use loader='memory' for in-memory arrays")
        try:
            import nvidia.dali  # noqa: F401
        except ImportError as e:
            raise ImportError(_DALI_HINT) from e
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {self.device} requested but CUDA is not available")

    def _chunks(self, epoch, j):
        # A plain function, not a method closure: the generator must not hold the loader, so that dropping the
        # loader frees the pipeline (and joins DALI's threads) at once instead of at the next GC.
        return _dali_chunks(self._shard, self._decoder, self.batch_size, self.num_workers, self.device,
                            self.num_samples + self._shard.per_rank, self._where(), epoch, j)


# Live DALI pipelines of this process: forking DataLoader workers while DALI threads run crashes the workers.
_LIVE_DALI = weakref.WeakSet()


def _host_read(decoder: _Decoder, epoch: int, idx: int):
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
    _LIVE_DALI.add(p)
    return p, fatal


def _dali_to_torch(out, device: torch.device) -> torch.Tensor:
    t = out.as_tensor()
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray
        dst = torch.empty(t.shape(), dtype=torch.uint8, device=device)
        feed_ndarray(t, dst, cuda_stream=torch.cuda.current_stream(device))
        return dst
    return torch.from_numpy(np.array(t))


def _dali_chunks(shard, decoder, batch_size, num_workers, device, bad_limit, where, epoch, j):
    """DALI chunks from (epoch, j), endless for ``_Sharding`` and until the stream ends for a finite one
    (``_OrderedSharding``); on a DALI error the batches in flight are decoded with PIL and a fresh pipeline
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
            epoch, j = (epoch + 1, 0) if j + 1 == shard.per_rank else (epoch, j + 1)
    finally:
        pool.shutdown(wait=False)


# ====================================================================================== one ordered pass

def shard_bounds(n: int, rank: int, world_size: int) -> Tuple[int, int]:
    """Rank ``rank``'s contiguous block ``[lo, hi)`` of ``n`` samples: ``lo = rank * n // world_size``."""
    return rank * n // world_size, (rank + 1) * n // world_size


class _OrderedSharding:
    """The (epoch, j, idx) stream protocol of ``_Sharding`` for one pass over ``indices``: epoch 0 only, finite."""

    def __init__(self, indices: np.ndarray):
        self.indices = indices
        self.per_rank = len(indices)

    def index(self, epoch: int, j: int) -> int:
        return int(self.indices[j])

    def chunks(self, epoch: int, j: int, size: int):
        """Lists of ``size`` consecutive (0, j, idx) from position j to the end (the last one shorter)."""
        if epoch > 0:
            return
        for a in range(j, self.per_rank, size):
            yield [(0, k, int(self.indices[k])) for k in range(a, min(a + size, self.per_rank))]


class _OrderedDecoder(_Decoder):
    """The deterministic ADM centre crop (no random draw); ``flip`` mirrors every image."""

    def __init__(self, source, image_size, flip):
        super().__init__(source, image_size, "center", bool(flip), 0)

    def plan(self, w: int, h: int, epoch: int, idx: int) -> CropPlan:
        return plan_crop(w, h, self.image_size, "center", self.flip, (0.5, 0.5, 0.5, 0.0))


class OrderedLoader:
    """One pass over this rank's block of the data set, in order (see the module docstring and
    ``make_ordered_loader``). Iterating again starts a fresh pass. After a pass, ``skipped`` is the number of
    undecodable images and ``corrupt`` their data-set indices (increasing); during a pass they may already
    count images of batches not yet handed out."""

    def __init__(self, source, image_size, batch_size, rank, world_size, backend, flip, device, num_workers):
        self.source, self.backend = source, backend
        self.image_size, self.batch_size = int(image_size), int(batch_size)
        self.rank, self.world_size, self.flip = int(rank), int(world_size), bool(flip)
        self.device = torch.device(device)
        self.num_workers = int(num_workers)
        self.num_samples = len(source)
        self.classes = list(source.classes)
        self.num_classes = len(self.classes)
        lo, hi = shard_bounds(self.num_samples, self.rank, self.world_size)
        self.indices = np.arange(lo, hi, dtype=np.int64)
        self._labels = source.labels
        self._decoder = _OrderedDecoder(source, self.image_size, self.flip)
        self.skipped, self.corrupt = 0, []
        if backend == "dali":
            if not isinstance(source, _EncodedSource):
                raise ValueError("loader='dali' decodes encoded image files; use loader='memory' for in-memory arrays")
            if self.device.type == "cuda" and not torch.cuda.is_available():
                raise RuntimeError(f"device {self.device} requested but CUDA is not available")

    def __len__(self) -> int:
        """Batches of a pass with no corrupt image (each corrupt one may remove a batch from the end)."""
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self):
        self.skipped, self.corrupt = 0, []
        return self._batches()

    def _where(self) -> str:
        return getattr(self.source, "root", None) or getattr(self.source, "shards", [type(self.source).__name__])[0]

    def _chunks(self) -> Iterable[Chunk]:
        shard, B = _OrderedSharding(self.indices), self.batch_size
        if self.backend == "dali":
            return _dali_chunks(shard, self._decoder, B, self.num_workers, self.device,
                                self.num_samples + shard.per_rank, self._where(), 0, 0)
        if self.backend == "memory":
            return _memory_ordered_chunks(self._decoder, shard, B)
        ctx = "forkserver" if self.num_workers > 0 and len(_LIVE_DALI) else None     # see TorchLoader
        return iter(torch.utils.data.DataLoader(
            self._decoder, batch_sampler=list(shard.chunks(0, 0, B)), num_workers=self.num_workers,
            collate_fn=_collate_chunk, multiprocessing_context=ctx, pin_memory=self.device.type == "cuda",
            prefetch_factor=2 if self.num_workers > 0 else None))

    def _batches(self):
        B, nb = self.batch_size, self.device.type == "cuda"
        if not len(self.indices):
            return
        imgs, idxs, have = [], [], 0          # decodable images not yet handed out, in order

        def emit(k):
            nonlocal imgs, idxs, have
            x = imgs[0] if len(imgs) == 1 else torch.cat(imgs)
            i = idxs[0] if len(idxs) == 1 else np.concatenate(idxs)
            imgs, idxs, have = ([x[k:]], [i[k:]], have - k) if len(i) > k else ([], [], 0)
            x, i = x[:k], i[:k]
            images = x.to(self.device, non_blocking=nb).float().div_(127.5).sub_(1.0)   # uint8 -> [-1, 1]
            labels = torch.from_numpy(self._labels[i]).to(self.device, non_blocking=nb)
            return images, labels, torch.from_numpy(np.ascontiguousarray(i))

        for images, metas in self._chunks():
            good = np.fromiter((i for _, _, i, r in metas if r >= 0), np.int64)
            bad = [i for _, _, i, r in metas if r < 0]
            if bad:
                self.skipped += len(bad)
                self.corrupt.extend(bad)
            if len(good):
                if images is None or len(images) != len(good):
                    raise RuntimeError(f"internal error: a chunk of {len(good)} decodable samples holds "
                                       f"{0 if images is None else len(images)} images")
                imgs.append(images)
                idxs.append(good)
                have += len(good)
            while have >= B:
                yield emit(B)
        if have:
            yield emit(have)                   # the last, partial batch


def _memory_ordered_chunks(decoder: _Decoder, shard: _OrderedSharding, batch_size: int):
    """ArraySource chunks: images already S x S are the identity crop (then gathered whole), else PIL."""
    imgs, S = decoder.source.images, decoder.image_size
    identity = imgs.shape[1:3] == (S, S)
    for keys in shard.chunks(0, 0, batch_size):
        if identity:
            idx = np.fromiter((k[2] for k in keys), np.int64)
            x = torch.from_numpy(imgs[idx]).permute(0, 3, 1, 2)
            yield (x.flip(-1) if decoder.flip else x).contiguous(), [(e, j, i, r) for r, (e, j, i) in enumerate(keys)]
        else:
            yield decoder.__getitems__(keys)


def _open_checked(source, image_size, batch_size, rank, world_size, num_workers, loader):
    """Validate the arguments shared by both factories; open the source; resolve loader="auto"."""
    if int(image_size) != image_size or image_size <= 0:
        raise ValueError(f"image_size must be a positive integer, got {image_size}")
    if int(batch_size) != batch_size or batch_size <= 0:
        raise ValueError(f"batch_size (per rank) must be a positive integer, got {batch_size}")
    if int(world_size) != world_size or world_size <= 0:
        raise ValueError(f"world_size must be a positive integer, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is out of range for world_size {world_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if loader == "dali" and not dali_available():
        raise ImportError(_DALI_HINT)
    src = open_source(source)
    if loader == "auto":
        loader = "memory" if isinstance(src, ArraySource) else ("dali" if dali_available() else "torch")
    if loader == "memory" and not isinstance(src, ArraySource):
        raise ValueError("loader='memory' takes in-memory arrays (ArraySource or 'digits'); use 'torch' or 'dali' "
                         "for files")
    return src, loader


def make_ordered_loader(source: Source, image_size: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                        loader: str = "auto", flip: bool = False, device: Union[str, torch.device] = "cpu",
                        num_workers: int = 2) -> OrderedLoader:
    """One ordered pass: an iterable of (images float32 (B,3,S,S) in [-1,1] on ``device``, labels int64 (B,) on
    ``device``, data-set indices int64 (B,) on the CPU) over rank ``rank``'s contiguous block
    (``shard_bounds``) of the data set, every index once and in increasing order.

    ADM centre crop to ``image_size`` with no random augmentation; ``flip=True`` mirrors every image. A batch
    is the next ``batch_size`` decodable images; the last batch holds the rest. Undecodable images are
    skipped: ``loader.skipped`` counts them and ``loader.corrupt`` lists their indices once the pass is done.
    ``loader``: "auto" (the memory loader for arrays, DALI if importable, else torch), "dali" (decodes on
    the GPU, "mixed", when ``device`` is CUDA, else on the CPU), "torch" (PIL, the reference recipe) or
    "memory". ``num_workers``: DataLoader workers (torch) or DALI threads."""
    if loader not in LOADERS:
        raise ValueError(f"unknown loader {loader!r}; choose one of {', '.join(LOADERS)}")
    src, loader = _open_checked(source, image_size, batch_size, rank, world_size, num_workers, loader)
    return OrderedLoader(src, int(image_size), int(batch_size), int(rank), int(world_size), loader, flip, device,
                         0 if loader == "memory" else int(num_workers))


# ====================================================================================== factory

def make_loader(source: Source, image_size: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                seed: int = 0, loader: str = "auto", augment: str = "center", flip: bool = False,
                device: Union[str, torch.device] = "cpu", num_workers: int = 2, drop_last: bool = True):
    """An endless, resumable iterator of (images float32 (B,3,S,S) in [-1,1] on ``device``, labels int64 (B,)).

    ``source``: an ImageFolder directory, webdataset .tar shard(s) (a directory of them, a path, a brace
    pattern or a list), an ``ArraySource``, or "digits" / "digits:train" / "digits:holdout".
    ``batch_size`` is per rank (see ``split_global_batch``). ``loader``: "auto" (DALI if importable, the
    memory loader for arrays, else torch), "dali", "torch" or "memory". ``augment``: "center" or
    "random_crop_flip"; ``flip`` adds random horizontal flips to "center"."""
    if loader not in LOADERS:
        raise ValueError(f"unknown loader {loader!r}; choose one of {', '.join(LOADERS)}")
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augment {augment!r}; choose one of {', '.join(AUGMENTS)}")
    src, loader = _open_checked(source, image_size, batch_size, rank, world_size, num_workers, loader)
    cls = {"memory": MemoryLoader, "torch": TorchLoader, "dali": DaliLoader}[loader]
    return cls(src, int(image_size), int(batch_size), int(rank), int(world_size), int(seed), augment, flip,
               device, int(num_workers), drop_last)
