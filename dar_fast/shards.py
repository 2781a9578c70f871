"""Verified shards: resumable, sharded generation into `.npz` files that are never half-written or silently wrong.

Used by `dar-fast fid` (and meant for `dar-fast reconstruct`). Items 0..N-1 are cut into shards of
`shard_size` consecutive indices; shard k holds items [k*S, min(N, (k+1)*S)).

Guarantees
- A shard file records its index range (start, count), every field's shape and dtype and a SHA-256 of its
  content; `verify_shard` checks all of it, so a truncated, empty, swapped (wrong start), short, re-shaped or
  re-typed shard is detected, deleted and regenerated (with a line saying so), never assembled.
- Every output `.npz` is streamed from the verified shards into a temporary file, then re-read from disk
  (member headers: count, shape, dtype; data: SHA-256 against what was written) before it replaces anything.
- Beside the main output, `<out>.json` (the manifest) records the settings (the caller includes model hashes,
  e.g. `dar_fast.io.file_sha256`), every output's size / mtime / data hash, versions and the date. A rerun with
  the same settings finds the result finished and does nothing; a rerun with other settings is refused with a
  UsageError unless `overwrite=True`; an output without a matching manifest is never replaced without
  `overwrite=True` (unless our own interrupted run with the same settings left it).
- An exclusive lock (`<out>.lock`, flock) keeps two runs from writing the same shards; stale temporary files
  of killed runs (dot-files included) are removed on start, under the lock.

API (rank 0 does begin/finish; every rank writes its own shards):

    so = ShardedOutput(out, settings, num_items=N, shard_size=B,
                       fields={"images": ((H, W, 3), np.uint8), "labels": ((), np.int64)},
                       outputs={out: {"arr_0": "images", "arr_1": "labels"}},   # npz path -> member -> field
                       overwrite=False, log=print)
    if so.begin():              # rank 0: lock, overwrite rule, stale-temp cleanup, shard-dir manifest
        return "already finished"      # (release with so.close())
    for k in so.pending(my_shards):    # missing or failing shards (failures are deleted and reported)
        start, stop = so.index_range(k)
        so.write(k, images=..., labels=...)       # checked against `fields`, written atomically
    so.finish(regenerate=lambda k: ..., keep_shards=False, extra={...})   # rank 0: verify all, assemble, verify,
                                                                          # manifest, remove shards, unlock

Lower-level pieces: `read_manifest`, `manifest_path`; in `dar_fast.shard_io`: `write_shard`, `verify_shard`,
`OutputLock`, `assemble_npz`, `verify_npz`.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import shutil
from contextlib import suppress
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np

from dar_fast.errors import UsageError
from dar_fast.io import remove_stale_temps, write_json_atomic
from dar_fast.shard_io import Fields, OutputLock, assemble_npz, verify_shard, write_shard

MANIFEST_FORMAT = "dar-fast-output/1"
_SHARD_RE = re.compile(r"^shard_(\d{6,})\.npz$")


def _json_norm(obj):
    """The value as it reads back from JSON (tuples -> lists), so settings compare equal across runs."""
    return json.loads(json.dumps(obj))


# ============================================================================================ the manifest

def manifest_path(out: str) -> str:
    """`samples.npz` -> `samples.json` (the manifest lives beside the output)."""
    root, ext = os.path.splitext(str(out))
    return (root if ext == ".npz" else str(out)) + ".json"


def read_manifest(out: str) -> Optional[dict]:
    try:
        with open(manifest_path(out)) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("format") == MANIFEST_FORMAT else None


def _versions() -> dict:
    import platform
    v = {"python": platform.python_version(), "numpy": np.__version__}
    with suppress(Exception):
        import dar_fast
        v["dar_fast"] = dar_fast.__version__
    with suppress(Exception):
        import torch
        v["torch"] = torch.__version__
    return v


def _file_record(path: str, hashes: Dict[str, str]) -> dict:
    st = os.stat(path)
    return dict(size=st.st_size, mtime_ns=st.st_mtime_ns, members=hashes)


def _diff(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}"
                     for k in keys if old.get(k) != new.get(k))


# ============================================================================================ the protocol

class ShardWriter:
    """Writes finished shards on one background thread, so the device generates the next batch while the
    previous one is hashed (SHA-256, 0.19 GB/s measured on one core, see `pending`: ~0.07 s for a 64 x 256 x 256 x 3
    uint8 shard, estimate 12.6 MB / 0.19 GB/s) and written.

    The queue holds at most `depth` shards (bounded memory). The first write error is raised in the generating
    thread at its next `put` or at `close`; `close` always waits for the queued shards, each written atomically,
    so an interrupted run keeps every shard it finished and a rerun regenerates the rest."""

    def __init__(self, out: "ShardedOutput", depth: int = 2):
        import queue
        import threading
        self.out, self.error = out, None
        self._q = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name="dar-fast-shard-writer", daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            item = self._q.get()
            if item is None:
                return
            if self.error is None:          # after a failure, drain without writing
                try:
                    self.out.write(item[0], **item[1])
                except BaseException as e:  # noqa: BLE001 - re-raised in the generating thread
                    self.error = e

    def _raise(self):
        if self.error is not None:
            err, self.error = self.error, None
            raise err

    def put(self, k: int, arrays: Dict[str, np.ndarray]) -> None:
        self._raise()
        self._q.put((k, arrays))

    def close(self, raise_error: bool = True) -> None:
        self._q.put(None)
        self._thread.join()
        if raise_error:
            self._raise()


class ShardedOutput:
    """See the module docstring. `outputs` maps each .npz path to {member name: field}; its first key is the
    main output (shards live in `<main>.shards/`, the lock is `<main>.lock`, the manifest `<main minus .npz>.json`)."""

    def __init__(self, out: str, settings: dict, num_items: int, shard_size: int, fields: Fields,
                 outputs: Optional[Dict[str, Dict[str, str]]] = None, overwrite: bool = False,
                 log: Callable[[str], None] = print):
        if num_items < 1 or shard_size < 1:
            raise UsageError(f"need at least one item and a shard size >= 1, got {num_items} and {shard_size}")
        self.out = str(out)
        self.settings = _json_norm(settings)
        self.num_items, self.shard_size = int(num_items), int(shard_size)
        self.fields = {k: (tuple(t), np.dtype(d)) for k, (t, d) in fields.items()}
        self.outputs = {str(p): dict(m) for p, m in (outputs or {self.out: {f"arr_{i}": k for i, k in
                                                                           enumerate(fields)}}).items()}
        if next(iter(self.outputs)) != self.out:
            raise ValueError("the first output must be `out`")
        for p, m in self.outputs.items():
            bad = [f for f in m.values() if f not in self.fields]
            if bad:
                raise ValueError(f"{p}: members read unknown fields {bad}")
        self.overwrite, self.log = overwrite, log
        self.dir = self.out + ".shards"
        self.lock = OutputLock(self.out)
        self.num_shards = (self.num_items + self.shard_size - 1) // self.shard_size
        self._shard_manifest = os.path.join(self.dir, "manifest.json")
        self._shard_settings = _json_norm(dict(settings=self.settings, num_items=self.num_items,
                                               shard_size=self.shard_size,
                                               fields={k: [list(t), d.str] for k, (t, d) in self.fields.items()}))

    # ---------------------------------------------------------------- geometry
    def index_range(self, k: int) -> Tuple[int, int]:
        return k * self.shard_size, min(self.num_items, (k + 1) * self.shard_size)

    def shard_path(self, k: int) -> str:
        return os.path.join(self.dir, f"shard_{k:06d}.npz")

    # ---------------------------------------------------------------- start (rank 0)
    def finished(self) -> bool:
        """True when every output exists and matches the manifest, which holds these settings."""
        m = read_manifest(self.out)
        if m is None or m.get("settings") != self.settings:
            return False
        files = m.get("outputs", {})
        for p in self.outputs:
            rec = files.get(os.path.basename(p))
            try:
                st = os.stat(p)
            except OSError:
                return False
            if not rec or rec.get("size") != st.st_size or rec.get("mtime_ns") != st.st_mtime_ns:
                return False
        return True

    def begin_on_all_ranks(self, rank: int, broadcast: Callable) -> bool:
        """`begin()` on rank 0, its outcome broadcast: every rank returns True when the result is already
        finished, or raises the same UsageError (a rank that never heard of rank 0's error would wait at the
        next barrier forever)."""
        status = "ok"
        if rank == 0:
            try:
                status = "done" if self.begin() else "ok"
            except UsageError as e:
                status = f"error:{e}"
        status = broadcast(status)
        if status.startswith("error:"):
            raise UsageError(status[len("error:"):])
        return status == "done"

    def begin(self) -> bool:
        """Lock, apply the overwrite rule, clean stale temps, pin the settings in the shard directory.
        Returns True (and releases the lock) if the result is already finished with these settings."""
        self.lock.acquire()
        try:
            parent = os.path.dirname(os.path.abspath(self.out))
            for p in list(self.outputs) + [manifest_path(self.out)]:
                remove_stale_temps(parent, os.path.basename(p))
            if self.finished():
                if os.path.isdir(self.dir):
                    if (read_manifest(self.out) or {}).get("shards_kept"):
                        self._remove_strays()        # kept shards stay; leftovers of killed writes go
                    else:                            # killed between the manifest and the clean-up: finish it
                        shutil.rmtree(self.dir, ignore_errors=True)
                self.lock.release(remove=True)
                return True
            self._check_overwrite()
            os.makedirs(self.dir, exist_ok=True)
            old = None
            with suppress(OSError, ValueError):
                with open(self._shard_manifest) as f:
                    old = json.load(f)
            if old is not None and old != self._shard_settings:
                if not self.overwrite:
                    diff = _diff(old.get("settings", {}), self.settings) or _diff(old, self._shard_settings)
                    raise UsageError(f"{self.dir} holds shards of an unfinished run with other settings ({diff}); "
                                     "rerun with those settings to finish it, or pass --overwrite to discard them")
                shutil.rmtree(self.dir)
                os.makedirs(self.dir)
                old = None
            removed = self._remove_strays()
            if removed:
                self.log(f"removed {removed} stale temporary file(s) from {self.dir}")
            if old is None:
                write_json_atomic(self._shard_manifest, self._shard_settings)
            return False
        except BaseException:
            self.lock.release()
            raise

    def _check_overwrite(self):
        existing = [p for p in self.outputs if os.path.exists(p)]
        if not existing:
            return
        m = read_manifest(self.out)
        if self.overwrite:
            with suppress(FileNotFoundError):       # the old manifest no longer describes what will be there
                os.unlink(manifest_path(self.out))
            return
        if m is not None and m.get("settings") != self.settings:
            raise UsageError(f"{existing[0]} is a finished result made with other settings "
                             f"({_diff(m.get('settings', {}), self.settings)}); pass --overwrite to replace it, "
                             "or choose another --out")
        # no manifest (or one that no longer matches the file): replace it only if our own interrupted run
        # with these settings wrote it (the shard directory says so)
        with suppress(OSError, ValueError):
            with open(self._shard_manifest) as f:
                if json.load(f) == self._shard_settings:
                    return
        raise UsageError(f"{existing[0]} already exists and {manifest_path(self.out)} does not describe it; "
                         "pass --overwrite to replace it, or choose another --out")

    def _remove_strays(self) -> int:
        """Everything in the shard directory but shards and the manifest is a leftover of a killed write."""
        n = 0
        for e in os.scandir(self.dir):
            if e.name == "manifest.json" or (_SHARD_RE.match(e.name) and e.is_file(follow_symlinks=False)):
                continue
            with suppress(OSError):
                if e.is_dir(follow_symlinks=False):
                    shutil.rmtree(e.path)
                else:
                    os.unlink(e.path)
                n += 1
        return n

    # ---------------------------------------------------------------- generation (every rank)
    def check(self, k: int) -> Optional[str]:
        start, stop = self.index_range(k)
        return verify_shard(self.shard_path(k), start, stop - start, self.fields)

    def pending(self, shards: Iterable[int]) -> List[int]:
        """The given shards that are missing or fail verification; failing files are reported and deleted."""
        shards = list(shards)
        # reading + SHA-256 release the GIL: verify on several cores. FID-50K at 256px is 9.8 GB of shards;
        # measured 0.19 GB/s of SHA-256 on one core of the shared 2-core test machine (52 s a pass); a free
        # core with SHA-NI does several times that (estimate), and 8 threads divide it where the disk keeps up
        workers = max(1, min(8, os.cpu_count() or 1, len(shards)))
        if workers > 1:
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(workers) as pool:
                reasons = list(pool.map(self.check, shards))
        else:
            reasons = [self.check(k) for k in shards]
        todo = []
        for k, why in zip(shards, reasons):
            if why is None:
                continue
            if why != "missing":
                self.log(f"shard {k} ({self.shard_path(k)}) failed verification: {why}; regenerating it")
                with suppress(FileNotFoundError):
                    os.unlink(self.shard_path(k))
            todo.append(k)
        return todo

    def write(self, k: int, **arrays: np.ndarray) -> None:
        start, stop = self.index_range(k)
        if set(arrays) != set(self.fields):
            raise RuntimeError(f"shard {k}: fields {sorted(arrays)}, expected {sorted(self.fields)}")
        for name, (tail, dtype) in self.fields.items():
            a = np.asarray(arrays[name])
            if a.shape != (stop - start, *tail) or a.dtype != dtype:
                raise RuntimeError(f"shard {k}: {name} is {a.dtype} {a.shape}, expected {dtype} "
                                   f"{(stop - start, *tail)}")
        write_shard(self.shard_path(k), start, arrays)

    # ---------------------------------------------------------------- end (rank 0)
    def finish(self, regenerate: Optional[Callable[[int], None]] = None, keep_shards: bool = False,
               extra: Optional[dict] = None) -> dict:
        """Verify every shard (regenerating failures with `regenerate(k)`), assemble and verify each output,
        write the manifest, remove the shards (unless keep_shards) and release the lock. Returns the manifest."""
        bad = self.pending(range(self.num_shards))
        if bad and regenerate is None:
            raise RuntimeError(f"{len(bad)} shard(s) missing or invalid (e.g. {self.shard_path(bad[0])})")
        for k in bad:
            regenerate(k)
            why = self.check(k)
            if why is not None:
                raise RuntimeError(f"shard {k} still fails verification after regenerating it: {why}")
        paths = [self.shard_path(k) for k in range(self.num_shards)]
        records = {}
        for p, members in self.outputs.items():
            def chunks(field):
                def gen():
                    for sp in paths:
                        with np.load(sp, allow_pickle=False) as z:
                            yield z[field]
                return gen
            spec = [(name, (self.num_items, *self.fields[f][0]), self.fields[f][1], chunks(f))
                    for name, f in members.items()]
            hashes = assemble_npz(p, spec)
            records[os.path.basename(p)] = _file_record(p, hashes)
        manifest = dict(format=MANIFEST_FORMAT, settings=self.settings, num_items=self.num_items,
                        outputs=records, shards_kept=bool(keep_shards), versions=_versions(),
                        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        **(extra or {}))
        write_json_atomic(manifest_path(self.out), manifest)
        if not keep_shards:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.lock.release(remove=True)
        return manifest

    def close(self) -> None:
        self.lock.release()
