"""Local and `s3://` storage through fsspec, with atomic visibility of written files.

Endpoint and options come from `storage_options` (flags / config) and the usual AWS
environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...; s3fs/botocore read those
themselves). Nothing here logs option values: they may hold credentials.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import fsspec

from dino_scale.io import atomic_write_with, is_remote

CHUNK = 4 << 20


def split_url(url: str) -> tuple[str, str]:
    """`s3://bucket/key` -> ("s3", "bucket/key"); a local path -> ("file", absolute path)."""
    if is_remote(url):
        scheme, rest = str(url).split("://", 1)
        return scheme, rest
    return "file", os.path.abspath(os.path.expanduser(str(url)))


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for `url`; `AWS_ENDPOINT_URL` fills in a missing S3 endpoint."""
    scheme, _ = split_url(url)
    options = dict(storage_options or {})
    if scheme in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        client_kwargs = dict(options.get("client_kwargs") or {})
        if endpoint and "endpoint_url" not in options and "endpoint_url" not in client_kwargs:
            options["endpoint_url"] = endpoint
        return fsspec.filesystem("s3", **options)
    return fsspec.filesystem(scheme, **options)


def is_safe_relative_name(name: str) -> bool:
    """True when `name` stays below the root it is joined to: relative, no `..` part,
    no scheme. Annotation files name images; a hostile one must not reach other files."""
    if not name or "://" in name or name.startswith(("/", "\\", "~")):
        return False
    return ".." not in name.replace("\\", "/").split("/")


def join(root: str, name: str) -> str:
    return str(root).rstrip("/") + "/" + name.lstrip("/")


def redact_url(url: str) -> str:
    """Drop any `user:password@` part so a URL can be logged or written to a manifest."""
    if "://" in url and "@" in url.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://" + rest.split("@", 1)[1]
    return url


class Storage:
    """A directory or object-store prefix: read, check and atomically publish named files."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None) -> None:
        self.root = str(root)
        self.scheme, self.base = split_url(self.root)
        self.storage_options = dict(storage_options or {})
        self._fs: fsspec.AbstractFileSystem | None = None

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:  # created lazily so a Storage pickles into Ray/loader workers
            self._fs = filesystem(self.root, self.storage_options)
        return self._fs

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fs"] = None
        return state

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    def path(self, name: str) -> str:
        return join(self.base, name)

    def url(self, name: str) -> str:
        return join(self.root, name) if not self.is_local else self.path(name)

    def makedirs(self) -> None:
        if self.is_local:
            Path(self.base).mkdir(parents=True, exist_ok=True)

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def size(self, name: str) -> int | None:
        try:
            return int(self.fs.size(self.path(name)))
        except (FileNotFoundError, OSError):
            return None

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open(self.path(name), "rb") as f:
            return f.read()

    def open(self, name: str, mode: str = "rb") -> BinaryIO:
        return self.fs.open(self.path(name), mode)

    def sha256(self, name: str) -> str:
        digest = hashlib.sha256()
        with self.fs.open(self.path(name), "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def write_atomic(self, name: str, write: Callable[[BinaryIO], Any]) -> None:
        """Publish `name` only once `write(file)` has finished without error.

        Local: temp file beside the target, fsync, rename. Object stores have no rename
        (s3fs `mv` is copy + delete, and an exception inside `fs.open(..., "wb")` still
        uploads the partial object), so the file is written locally and then uploaded
        whole with `put_file`.
        """
        if self.is_local:
            atomic_write_with(self.path(name), write)
            return
        with tempfile.TemporaryDirectory(prefix="dino-stage-") as stage:
            local = os.path.join(stage, os.path.basename(name))
            with open(local, "wb") as f:
                write(f)
            self.put_file(local, name)

    def put_file(self, local_path: str, name: str) -> None:
        """Upload (or, locally, copy then rename) a finished file to `name`."""
        if self.is_local:
            def copy(f: BinaryIO) -> None:
                with open(local_path, "rb") as src:
                    shutil.copyfileobj(src, f, CHUNK)

            atomic_write_with(self.path(name), copy)
            return
        self.fs.put_file(local_path, self.path(name))
        self.fs.invalidate_cache(self.path(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        self.write_atomic(name, lambda f: f.write(data))

    def remove(self, name: str) -> None:
        try:
            self.fs.rm(self.path(name))
        except FileNotFoundError:
            pass
