"""pytest plugin: an S3-compatible server on 127.0.0.1 for the whole session (moto's
in-memory server, ~0.5 s to start) and a fresh bucket per test.

`s3_bucket` yields an `S3Bucket` with `url` ("s3://<bucket>") and `storage_options`
(endpoint + dummy credentials) to hand to fsspec/s3fs, our Storage, DataConfig or
`--storage-option` flags. The server is started in its own session and stopped by
process group.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dino_scale.engine.distributed import free_port

ACCESS_KEY = "dino-test-access-key"
SECRET_KEY = "dino-test-secret-value-0123456789"


@dataclass
class S3Bucket:
    name: str
    endpoint: str
    storage_options: dict[str, Any]

    @property
    def url(self) -> str:
        return f"s3://{self.name}"

    def fs(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options)


def _moto_server_command(port: int) -> list[str]:
    exe = Path(sys.executable).with_name("moto_server")
    if exe.exists():
        return [str(exe), "-H", "127.0.0.1", "-p", str(port)]
    if shutil.which("moto_server"):
        return ["moto_server", "-H", "127.0.0.1", "-p", str(port)]
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    port = free_port()
    log = open(tmp_path_factory.mktemp("s3server") / "moto.log", "wb")
    proc = subprocess.Popen(_moto_server_command(port), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
                pytest.fail(f"moto_server did not start on {endpoint} (see {log.name})")
            time.sleep(0.05)
    try:
        yield endpoint
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> Iterator[S3Bucket]:
    """A fresh, empty bucket for one test."""
    options = {"endpoint_url": s3_endpoint, "key": ACCESS_KEY, "secret": SECRET_KEY,
               "use_listings_cache": False}
    bucket = S3Bucket(f"test-{uuid.uuid4().hex[:12]}", s3_endpoint, options)
    fs = bucket.fs()
    fs.mkdir(bucket.name)
    yield bucket
    try:
        fs.rm(bucket.name, recursive=True)
    except (FileNotFoundError, OSError):
        pass
