"""Reading a shard that fails part-way (a dropped object-store connection): the reader
reopens it at the first sample not yet read, so every sample arrives exactly once; what
cannot be read after the retries is counted, never duplicated."""

from __future__ import annotations

import errno
import io
import tarfile
from pathlib import Path

import pytest

from dino_scale.data import stream
from dino_scale.data.samples import BadSample
from dino_scale.data.storage import Storage
from dino_scale.data.stream import Segment, read_segments

SAMPLES = 8


def _write_shard(path: Path) -> None:
    with tarfile.open(path, "w") as tar:
        for k in range(SAMPLES):
            for extension, size in (("jpg", 30000 + 7000 * k), ("json", 40)):
                data = bytes([k]) * size
                info = tarfile.TarInfo(f"sample{k:04d}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


class _Dropping(io.RawIOBase):
    """A file that raises ECONNRESET once `fail_after` bytes have been read through it."""

    def __init__(self, file, fail_after: int | None) -> None:
        self.file, self.fail_after, self.read_bytes = file, fail_after, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.file.seek(offset, whence)

    def readinto(self, buffer) -> int:
        if self.fail_after is not None and self.read_bytes >= self.fail_after:
            raise ConnectionResetError(errno.ECONNRESET, "connection reset by peer")
        limit = len(buffer) if self.fail_after is None else min(len(buffer), self.fail_after - self.read_bytes)
        data = self.file.read(limit)
        buffer[:len(data)] = data
        self.read_bytes += len(data)
        return len(data)

    def close(self) -> None:
        self.file.close()
        super().close()


@pytest.fixture
def shard(tmp_path, monkeypatch):
    monkeypatch.setattr(stream.time, "sleep", lambda seconds: None)
    path = tmp_path / "shard-000000.tar"
    _write_shard(path)
    return path


def _opener(path: Path | Storage, failures: list[int | None]):
    """Open number i drops after failures[i] bytes (None: never); opens past the list never drop."""
    opened: list[int] = []

    def open_shard(name: str):
        opened.append(len(opened))
        fail_after = failures[len(opened) - 1] if len(opened) <= len(failures) else None
        file = path.open(name) if isinstance(path, Storage) else open(path.parent / name, "rb")
        return io.BufferedReader(_Dropping(file, fail_after), buffer_size=1024)

    return open_shard, opened


def _read(open_shard, start: int = 0) -> list[tuple[int, dict | BadSample]]:
    return list(read_segments([Segment("shard-000000.tar", start, SAMPLES)], open_shard, lambda i: True))


def test_dropped_reads_resume_at_the_first_unread_sample(shard):
    open_shard, opened = _opener(shard, [90000, 70000])  # mid-sample drops on the first two opens
    results = _read(open_shard)
    assert len(opened) == 3
    assert [index for index, _ in results] == list(range(SAMPLES))
    assert not [s for _, s in results if isinstance(s, BadSample)]
    for k, (_, sample) in enumerate(results):
        assert sample["__key__"] == f"sample{k:04d}" and sample["jpg"] == bytes([k]) * (30000 + 7000 * k)


def test_dropped_s3_reads_resume_with_ranged_gets(shard, s3_bucket):
    storage = Storage(f"{s3_bucket.url}/shards", s3_bucket.storage_options)
    storage.put_file(str(shard), shard.name)
    open_shard, opened = _opener(storage, [90000, 150000])
    results = _read(open_shard)
    assert len(opened) == 3
    assert [s["__key__"] for _, s in results] == [f"sample{k:04d}" for k in range(SAMPLES)]
    assert all(s["jpg"] == bytes([k]) * (30000 + 7000 * k) for k, (_, s) in enumerate(results))


def test_resume_inside_a_segment_that_starts_mid_shard(shard):
    open_shard, opened = _opener(shard, [200000])
    results = _read(open_shard, start=3)
    assert len(opened) == 2
    assert [s["__key__"] for _, s in results] == [f"sample{k:04d}" for k in range(3, SAMPLES)]


def test_persistent_drops_count_the_rest_once(shard):
    # every open drops after 90000 bytes: each retry gets further, then they run out
    open_shard, opened = _opener(shard, [90000] * 10)
    results = _read(open_shard)
    assert len(opened) == 4  # the first read and 3 retries
    assert [index for index, _ in results] == list(range(SAMPLES))  # each index exactly once
    good = [s for _, s in results if not isinstance(s, BadSample)]
    bad = [s for _, s in results if isinstance(s, BadSample)]
    assert good and bad and {s.reason for s in bad} == {"shard_read_error"}
    assert "connection reset" in str(bad[0])


def test_a_truncated_shard_is_not_retried(shard):
    shard.write_bytes(shard.read_bytes()[:120000])
    open_shard, opened = _opener(shard, [])
    results = _read(open_shard)
    assert len(opened) == 1
    bad = [s for _, s in results if isinstance(s, BadSample)]
    assert bad and {s.reason for s in bad} == {"truncated_tar"}
    assert len(results) == SAMPLES
