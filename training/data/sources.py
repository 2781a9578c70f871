"""Data sources: an ImageFolder tree, webdataset ``.tar`` shards (a directory of them, one path, a brace pattern
``shard-{000..009}.tar`` or a list), in-memory arrays (``ArraySource``), or "digits" / "digits:train" /
"digits:holdout" (scikit-learn's bundled digits, no network).

A source has ``labels`` int64 (N,), ``classes`` (names) and ``load(idx)`` -> an RGB PIL image; the encoded ones
(folder, tar) also ``read_bytes(idx)`` for the DALI backend.
"""
from __future__ import annotations

import collections
import functools
import io
import json
import os
import re
import stat
import tarfile
import warnings
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from dar_fast.errors import MissingPackage, UsageError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp")
TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")          # webdataset image fields, in order of preference
TAR_LABEL_EXTS = ("cls", "json", "txt")                   # webdataset label fields, in order of preference


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
            raise UsageError(f"ArraySource: images must be (N, H, W, 3), (N, H, W, 1) or (N, H, W) channels-last, "
                             f"got shape {tuple(images.shape)}")
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        if images.dtype != np.uint8:
            if not np.issubdtype(images.dtype, np.floating):
                raise UsageError(f"ArraySource: images must be uint8 or float, got {images.dtype}")
            lo, hi = value_range
            images = np.clip(np.rint((images.astype(np.float64) - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
        if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise UsageError(f"ArraySource: labels must be integers of shape ({images.shape[0]},), "
                             f"got {labels.dtype} {tuple(labels.shape)}")
        if images.shape[0] == 0:
            raise UsageError("ArraySource: no images")
        if labels.min() < 0:
            raise UsageError("ArraySource: labels must be >= 0")
        self.images = np.ascontiguousarray(images)
        self.labels = labels.astype(np.int64)
        n_cls = int(self.labels.max()) + 1
        self.classes = list(classes) if classes is not None else [str(i) for i in range(n_cls)]
        if len(self.classes) < n_cls:
            raise UsageError(f"ArraySource: {len(self.classes)} class names for label ids up to {n_cls - 1}")

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
            raise UsageError("not an image (magic bytes)")
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
                raise UsageError(f"{root} holds images but no class sub-directories; the ImageFolder layout is "
                                 f"root/<class>/<image> (found e.g. {loose[0]})")
            raise UsageError(f"data directory is empty (no class sub-directories): {root}")
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
            raise UsageError(f"no images under {root} (looked for {', '.join(IMG_EXTENSIONS)} in "
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
                raise UsageError(f"json label has none of the keys label/cls/class/class_id/target: {text[:80]}")
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
            raise UsageError("no .tar shards given")
        for s in shards:
            if not os.path.isfile(s):
                raise FileNotFoundError(f"tar shard not found: {s}")
        self.shards = shards
        shard_of, offsets, sizes, raw_labels = [], [], [], []
        for si, path in enumerate(shards):
            try:
                tf = tarfile.open(path, "r:")
            except tarfile.ReadError as e:
                raise UsageError(f"cannot read {path} as an uncompressed tar shard: {e}") from e
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
                                raise UsageError(f"{path}: bad label in member {m.name}: {e}") from e
            for key, rec in samples.items():
                if "img" not in rec:
                    continue
                shard_of.append(si)
                offsets.append(rec["img"][1])
                sizes.append(rec["img"][2])
                raw_labels.append(rec["label"][1] if "label" in rec else None)
        if not offsets:
            raise UsageError(f"no images ({'/'.join(TAR_IMAGE_EXTS)}) in {len(shards)} tar shard(s), e.g. {shards[0]}")
        have = [v is not None for v in raw_labels]
        if not any(have):
            self.labels = np.zeros(len(raw_labels), dtype=np.int64)
            self.classes = ["0"]
        elif not all(have):
            raise UsageError(f"{have.count(False)} of {len(have)} tar samples have no cls/json/txt label")
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in raw_labels):
            self.labels = np.asarray(raw_labels, dtype=np.int64)
            if self.labels.min() < 0:
                raise UsageError("tar labels must be >= 0")
            self.classes = [str(i) for i in range(int(self.labels.max()) + 1)]
        elif all(isinstance(v, str) for v in raw_labels):
            self.classes = sorted(set(raw_labels))
            ids = {c: i for i, c in enumerate(self.classes)}
            self.labels = np.asarray([ids[v] for v in raw_labels], dtype=np.int64)
        else:
            raise UsageError("tar labels mix integer ids and class names")
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
            raise UsageError(f"a list source must name .tar shards, got {bad[0]}")
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
def _digits_cached():           # importing scikit-learn took 1.4 s on a 2-core CPU machine (measured): once per process
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise MissingPackage("the digits data set needs scikit-learn: pip install scikit-learn") from e
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
        raise UsageError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    images, labels = load_digits_arrays()
    rng = np.random.default_rng(seed)
    hold = np.zeros(len(labels), dtype=bool)
    for c in range(int(labels.max()) + 1):
        members = np.flatnonzero(labels == c)
        k = int(round(len(members) * holdout_fraction))
        hold[rng.permutation(members)[:k]] = True
    return (images[~hold], labels[~hold]), (images[hold], labels[hold])


def where(source) -> str:
    """A source's name for messages: its root, its first shard, or its type."""
    return getattr(source, "root", None) or getattr(source, "shards", [type(source).__name__])[0]
