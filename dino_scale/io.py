"""Atomic local writes and fsspec-aware path helpers shared by every stage."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def is_remote(path: str | os.PathLike) -> bool:
    """True for URLs such as `s3://bucket/key` (anything with a `scheme://`)."""
    return "://" in str(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a local `path` so that readers see the old file or the whole new one."""
    atomic_write_with(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(path: str | os.PathLike, write: Callable[[Any], Any]) -> None:
    """Call `write(file)` on a temp file beside `path`, fsync it, then rename it over `path`.

    On any exception the temp file is removed and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; published files get the usual umask-derived mode so readers
        # under other uids (loader pods, Ray workers) can open them.
        os.fchmod(fd, 0o666 & ~_current_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
