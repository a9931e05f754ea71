"""Damage WebDataset shards the way storage and upstream tools do, for the fault suite."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

Edit = Callable[[str, dict[str, bytes]], dict[str, bytes]]


def rewrite_shard(path: Path, edit: Edit) -> None:
    """Rewrite `path` with `edit(key, {ext: bytes})` applied to each sample, in order."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, parts in samples.items():
            for ext, payload in edit(key, dict(parts)).items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    path.write_bytes(out.getvalue())


def _edit_nth(n: int, change: Callable[[dict[str, bytes]], None]) -> Edit:
    seen = [0]

    def edit(key: str, parts: dict[str, bytes]) -> dict[str, bytes]:
        if seen[0] == n:
            change(parts)
        seen[0] += 1
        return parts

    return edit


def _truncate_jpeg(parts: dict[str, bytes]) -> None:
    parts["jpg"] = parts["jpg"][: len(parts["jpg"]) // 3]


def _garbage_jpeg(parts: dict[str, bytes]) -> None:
    parts["jpg"] = b"\xff\xd8\xff\xe0 this is not a JPEG stream"


def _boxes(value: list[float]) -> Callable[[dict[str, bytes]], None]:
    def change(parts: dict[str, bytes]) -> None:
        meta = json.loads(parts["json"])
        meta["boxes"], meta["category_ids"], meta["iscrowd"] = [value], [1], [0]
        parts["json"] = json.dumps(meta).encode()

    return change


def corrupt_copy(src: Path, dst: Path) -> dict[str, int]:
    """Copy the shard directory `src` (manifest + shards) to `dst` and damage it: one bad
    sample in each of the first shards (truncated JPEG, undecodable JPEG, NaN box,
    negative box) and the last shard cut inside its sample data (truncated tar).
    Returns the damaged samples by the reason the loader gives them."""
    shutil.copytree(src, dst)
    shards = sorted(dst.glob("*.tar"))
    assert len(shards) >= 5, shards
    rewrite_shard(shards[0], _edit_nth(1, _truncate_jpeg))
    rewrite_shard(shards[1], _edit_nth(2, _garbage_jpeg))
    rewrite_shard(shards[2], _edit_nth(3, _boxes([1.0, 1.0, float("nan"), 3.0])))
    rewrite_shard(shards[3], _edit_nth(4, _boxes([2.0, 2.0, -5.0, 4.0])))
    last = shards[-1]
    with tarfile.open(last) as tar:
        jpgs = [m for m in tar.getmembers() if m.name.endswith(".jpg")]
    cut = len(jpgs) // 2  # samples from this one on are lost with the tail
    last.write_bytes(last.read_bytes()[: jpgs[cut].offset_data + 10])
    return {"undecodable_image": 2, "bad_boxes": 2, "truncated_tar": len(jpgs) - cut}
