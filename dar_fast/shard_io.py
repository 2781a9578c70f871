"""The verified files under `dar_fast.shards`: shard `.npz` files, streamed `.npz` outputs, the output lock.

- `write_shard` / `verify_shard`: a shard file records its index range (start, count), every field's shape and
  dtype and a SHA-256 of its content, and `verify_shard` checks all of it (the reason as one string, or None).
- `assemble_npz` / `verify_npz`: an uncompressed `.npz` streamed from chunks into a temporary file and re-read
  (member headers, data SHA-256) before it replaces anything.
- `OutputLock`: an exclusive, non-blocking flock on `<out>.lock`.

`dar_fast.shards.ShardedOutput` puts these together into resumable sharded generation.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from contextlib import suppress
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import numpy as np

from dar_fast.errors import UsageError
from dar_fast.io import atomic_write

SHARD_FORMAT = "dar-fast-shard/1"
_META = "__shard__"

Fields = Dict[str, Tuple[Tuple[int, ...], object]]     # field -> (shape after the item axis, dtype)


# ============================================================================================ shard files

def _content_hash(arrays: Dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def write_shard(path: str, start: int, arrays: Dict[str, np.ndarray]) -> None:
    """Atomically write items [start, start+count) as an .npz with a metadata record (range, shapes, dtypes, hash)."""
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    counts = {k: (v.shape[0] if v.ndim else None) for k, v in arrays.items()}
    if len(set(counts.values())) != 1 or None in counts.values():
        raise ValueError(f"shard fields must share their first (item) axis, got {counts}")
    meta = dict(format=SHARD_FORMAT, start=int(start), count=int(next(iter(counts.values()))),
                arrays={k: dict(shape=list(v.shape), dtype=v.dtype.str) for k, v in arrays.items()},
                sha256=_content_hash(arrays))
    blob = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    atomic_write(path, lambda f: np.savez(f, **arrays, **{_META: blob}))


def verify_shard(path: str, start: int, count: int, fields: Optional[Fields] = None) -> Optional[str]:
    """None if the shard at `path` holds exactly items [start, start+count) with the expected fields; else the reason."""
    if not os.path.isfile(path):
        return "missing"
    try:
        with np.load(path, allow_pickle=False) as z:
            if _META not in z.files:
                return "no shard record (not written by this version)"
            meta = json.loads(bytes(z[_META]).decode())
            arrays = {k: z[k] for k in z.files if k != _META}
    except Exception as e:       # truncated / empty / not a zip / bad member: all mean "regenerate"
        return f"unreadable ({type(e).__name__}: {str(e)[:120]})"
    if meta.get("format") != SHARD_FORMAT:
        return f"format {meta.get('format')!r}, expected {SHARD_FORMAT!r}"
    if meta.get("start") != start or meta.get("count") != count:
        return f"holds items [{meta.get('start')}, +{meta.get('count')}), expected [{start}, +{count})"
    if set(meta.get("arrays", {})) != set(arrays):
        return f"fields {sorted(arrays)} do not match its record {sorted(meta.get('arrays', {}))}"
    for k, a in arrays.items():
        rec = meta["arrays"][k]
        if list(a.shape) != rec["shape"] or a.dtype.str != rec["dtype"]:
            return f"field {k}: {a.dtype} {a.shape} does not match its record {rec}"
        if a.shape[:1] != (count,):
            return f"field {k} has {a.shape[0] if a.ndim else 0} items, expected {count}"
    if fields is not None:
        if set(fields) != set(arrays):
            return f"fields {sorted(arrays)}, expected {sorted(fields)}"
        for k, (tail, dtype) in fields.items():
            if tuple(arrays[k].shape[1:]) != tuple(tail) or arrays[k].dtype != np.dtype(dtype):
                return (f"field {k} is {arrays[k].dtype} {tuple(arrays[k].shape[1:])} per item, expected "
                        f"{np.dtype(dtype)} {tuple(tail)}")
    if _content_hash(arrays) != meta.get("sha256"):
        return "content does not match its checksum (corrupted)"
    return None


# ============================================================================================ the lock

class OutputLock:
    """Exclusive, non-blocking flock on `<out>.lock`; a second run fails at once with a UsageError naming the holder."""

    def __init__(self, out: str):
        self.path = str(out) + ".lock"
        self.fd: Optional[int] = None

    def acquire(self) -> "OutputLock":
        import fcntl
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise UsageError(f"another run (pid {holder}) is writing {self.path[:-5]}: wait for it to finish, "
                                 "or choose another --out")
            except OSError:
                os.close(fd)       # a file system without flock: carry on unlocked rather than refuse to work
                return self
            # the holder before us may have finished and unlinked the file: lock the file that is at the path now
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def release(self, remove: bool = False) -> None:
        if self.fd is None:
            return
        if remove:
            with suppress(FileNotFoundError):
                os.unlink(self.path)
        os.close(self.fd)       # closing drops the flock
        self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# ============================================================================================ npz assembly

def _npy_header(shape, dtype) -> bytes:
    import io
    b = io.BytesIO()
    np.lib.format.write_array_header_2_0(b, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                             "fortran_order": False, "shape": tuple(shape)})
    return b.getvalue()


def assemble_npz(path: str, members: Sequence[Tuple[str, Tuple[int, ...], object, Callable[[], Iterable[np.ndarray]]]]
                 ) -> Dict[str, str]:
    """Stream members (name, full shape, dtype, chunk-iterator factory) into an uncompressed .npz, atomically.

    Each member's chunks must add up to exactly its shape. The temporary file is re-read before it replaces
    `path` (`verify_npz`); returns {member: sha256 of its data}."""
    hashes: Dict[str, str] = {}

    def write(f):
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, shape, dtype, chunks in members:
                h, rows, tail = hashlib.sha256(), 0, tuple(shape[1:])
                # a fixed member date (zip's epoch): the same content gives the same bytes, whenever it is written
                info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_STORED
                with zf.open(info, "w", force_zip64=True) as m:
                    m.write(_npy_header(shape, dtype))
                    for c in chunks():
                        c = np.asarray(c)
                        if tuple(c.shape[1:]) != tail or c.dtype != np.dtype(dtype):
                            raise RuntimeError(f"{name}: a chunk is {c.dtype} {c.shape}, expected {np.dtype(dtype)} "
                                               f"(*, {', '.join(map(str, tail))})")
                        rows += c.shape[0]
                        if rows > shape[0]:
                            raise RuntimeError(f"{name}: more than the expected {shape[0]} items")
                        data = np.ascontiguousarray(c).tobytes()
                        h.update(data)
                        m.write(data)
                if rows != shape[0]:
                    raise RuntimeError(f"{name}: {rows} items written, expected {shape[0]}")
                hashes[name] = h.hexdigest()

    expect = {name: (tuple(shape), np.dtype(dtype)) for name, shape, dtype, _ in members}
    atomic_write(path, write, verify=lambda tmp: verify_npz(tmp, expect, hashes))
    return hashes


def verify_npz(path: str, expect: Dict[str, Tuple[Tuple[int, ...], object]],
               hashes: Optional[Dict[str, str]] = None) -> None:
    """Raise RuntimeError unless the .npz at `path` holds exactly the members `expect` (name -> (shape, dtype)),
    readable by np.load, with data matching `hashes` (member -> sha256) when given. Streams: no member is
    loaded whole."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
            if names != sorted(expect) or len(zf.namelist()) != len(expect):
                raise RuntimeError(f"members {zf.namelist()}, expected {sorted(expect)}")
            for name, (shape, dtype) in expect.items():
                with zf.open(name + ".npy") as m:       # zipfile checks each member's CRC-32 on reading to the end
                    version = np.lib.format.read_magic(m)
                    read = {(1, 0): np.lib.format.read_array_header_1_0,
                            (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                    if read is None:
                        raise RuntimeError(f"{name}: unknown .npy format version {version}")
                    shp, fortran, dt = read(m)
                    if tuple(shp) != tuple(shape) or dt != np.dtype(dtype) or fortran:
                        raise RuntimeError(f"{name} is {dt} {shp}, expected {np.dtype(dtype)} {tuple(shape)}")
                    h, n = hashlib.sha256(), 0
                    for block in iter(lambda: m.read(1 << 22), b""):
                        h.update(block)
                        n += len(block)
                    if n != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
                        raise RuntimeError(f"{name} holds {n} data bytes, expected {tuple(shape)} x {np.dtype(dtype)}")
                    if hashes is not None and h.hexdigest() != hashes.get(name):
                        raise RuntimeError(f"{name}: data on disk differs from the data written")
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise RuntimeError(f"{path}: not a valid .npz ({type(e).__name__}: {e})") from e
