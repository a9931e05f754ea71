"""Can every path and URL a run reads be read? Local paths by `stat`/`access`; `s3://` by
one cheap call per bucket (list at most one key) that proves credentials and endpoint,
then `head`/`list` of the objects. Nothing is read in full."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import fsspec

from dino_scale.data.storage import filesystem, redact_url, split_url
from dino_scale.errors import user_message
from dino_scale.preflight.report import Report

# short timeouts, no retries: a preflight answers in seconds, even for a dead endpoint
PROBE_CONFIG = {"connect_timeout": 5, "read_timeout": 10, "retries": {"max_attempts": 1}}
Kind = Literal["file", "dir"]


class Locations:
    """Checks locations, remembering per bucket whether S3 access works (one probe each)."""

    def __init__(self, report: Report, storage_options: dict[str, Any]) -> None:
        self.report = report
        self.storage_options = storage_options
        self._buckets: dict[str, bool] = {}
        self._fs: fsspec.AbstractFileSystem | None = None

    def s3_fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:
            options = dict(self.storage_options)
            options["config_kwargs"] = {**(options.get("config_kwargs") or {}), **PROBE_CONFIG}
            options["skip_instance_cache"] = True
            self._fs = filesystem("s3://probe", options)
        return self._fs

    def bucket_reachable(self, url: str, key: str) -> bool:
        """One list call (1 key) per bucket; a FAIL row names the bucket and the setting."""
        bucket = split_url(url)[1].split("/", 1)[0]
        if bucket in self._buckets:
            return self._buckets[bucket]
        endpoint = self._endpoint()
        try:
            self.s3_fs().call_s3("list_objects_v2", Bucket=bucket, MaxKeys=1)
        except Exception as exc:  # noqa: BLE001 - every failure becomes the row's message
            self._buckets[bucket] = False
            self.report.fail(f"s3://{bucket}", f"{_describe(exc)} [endpoint {endpoint}; needed by {key}]")
            return False
        self._buckets[bucket] = True
        self.report.ok(f"s3://{bucket}", f"credentials and endpoint work (endpoint {endpoint})")
        return True

    def _endpoint(self) -> str:
        options = self.storage_options
        return str(options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")
                   or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS default")

    def readable(self, url: str, kind: Kind, key: str, what: str) -> bool:
        """A FAIL row (named after `key`) unless `url` is a readable file / listable directory."""
        scheme, path = split_url(url)
        shown = redact_url(str(url))
        if scheme == "file":
            problem = local_problem(Path(path), kind)
        elif scheme in ("s3", "s3a"):
            if not self.bucket_reachable(url, key):
                self.report.skip(key, f"{shown}: not checked (bucket unreachable)")
                return False
            problem = self._s3_problem(path, kind)
        else:
            problem = None  # other fsspec schemes: left to the run itself
        if problem:
            self.report.fail(key, f"{what} {shown} {problem}")
            return False
        self.report.ok(key, f"{what} {shown}")
        return True

    def _s3_problem(self, path: str, kind: Kind) -> str | None:
        fs = self.s3_fs()
        try:
            if kind == "file":
                info = fs.info(path)
                return "is a prefix, not an object" if info.get("type") == "directory" else None
            return None if fs.ls(path.rstrip("/"), detail=False) else "holds no objects"
        except FileNotFoundError:
            return "does not exist"
        except Exception as exc:  # noqa: BLE001
            return f"cannot be read: {_describe(exc)}"

    def listing(self, url: str) -> dict[str, int]:
        """{file name: size} directly under a directory / prefix (empty when unreadable)."""
        scheme, path = split_url(url)
        try:
            if scheme == "file":
                return {e.name: e.stat().st_size for e in os.scandir(path) if e.is_file()}
            entries = self.s3_fs().ls(path.rstrip("/"), detail=True)
        except OSError:
            return {}
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in entries}


def local_problem(path: Path, kind: Kind) -> str | None:
    """Why `path` cannot be read as a `kind`, or None."""
    if not path.exists():
        parent = next((p for p in path.parents if p.exists()), None)
        return f"does not exist (nearest existing parent: {parent})"
    if kind == "file" and not path.is_file():
        return "is not a file"
    if kind == "dir" and not path.is_dir():
        return "is not a directory"
    mode = os.R_OK | (os.X_OK if kind == "dir" else 0)
    if not os.access(path, mode):
        return "is not readable by this user"
    return None


def _describe(exc: BaseException) -> str:
    return user_message(exc) or f"{type(exc).__name__}: {' '.join(str(exc).split())}"
