"""Atomic file writes: a failure never leaves a half-written output file."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO, Callable, Union

PathLike = Union[str, "os.PathLike[str]"]


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call `write(f)` on a temporary file beside `path`, fsync, then os.replace onto `path`.

    A failure (including KeyboardInterrupt) removes the temporary file and leaves
    any existing `path` untouched, so readers never see a half-written file.
    """
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent if str(p.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode open() would
        os.replace(tmp, p)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return p


def write_json_atomic(path: PathLike, obj) -> Path:
    """json.dump(obj) (indented, trailing newline) through a temporary file + os.replace."""
    data = (json.dumps(obj, indent=2) + "\n").encode()
    return atomic_write(path, lambda f: f.write(data))
