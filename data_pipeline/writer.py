"""Write one WebDataset shard: validate images and boxes, optionally re-encode, publish
atomically, then record a sidecar that lets a re-run skip the finished shard.

Sample layout (see docs/interfaces.md): `<image_id>.jpg` and `<image_id>.json` with
`{"image_id", "file_name", "orig_size": [h, w], "size": [h, w], "boxes": [[x, y, w, h]...]
(absolute, stored pixels), "category_ids", "iscrowd"}`.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from data_pipeline.plan import ShardTask
from dino_scale.data.storage import Storage, is_safe_relative_name

SAMPLE_FORMAT_VERSION = 1


@dataclass
class WriterSettings:
    images_root: str
    output_root: str
    known_category_ids: list[int]
    input_storage_options: dict[str, Any] = field(default_factory=dict)
    output_storage_options: dict[str, Any] = field(default_factory=dict)
    max_side: int | None = None  # re-encode images whose longer side exceeds this
    jpeg_quality: int = 90
    verify: str = "sha256"  # how a finished shard is checked on re-run: "sha256" or "size"


def sidecar_name(shard: str) -> str:
    """`shard-000001.tar` -> `shard-000001.done.json`, written only after the shard."""
    return shard[: -len(".tar")] + ".done.json"


def verified_record(out: Storage, task: ShardTask, verify: str) -> dict[str, Any] | None:
    """The sidecar of a finished shard whose plan, size (and sha256) still match, else None."""
    try:
        record = json.loads(out.read_bytes(sidecar_name(task.name)))
    except FileNotFoundError:
        return None
    except ValueError:  # torn or foreign sidecar: rebuild the shard
        return None
    if not isinstance(record, dict) or record.get("digest") != task.digest:
        return None
    if out.size(task.name) != record.get("bytes"):
        return None
    if verify == "sha256" and out.sha256(task.name) != record.get("sha256"):
        return None
    return record


def write_shard(task: ShardTask, settings: WriterSettings) -> dict[str, Any]:
    """Build `task.name` unless a verified copy exists; returns its record with a `status`."""
    out = Storage(settings.output_root, settings.output_storage_options)
    record = verified_record(out, task, settings.verify)
    if record is not None:
        return {**record, "status": "skipped"}
    start = time.perf_counter()
    images = Storage(settings.images_root, settings.input_storage_options)
    known = np.asarray(sorted(settings.known_category_ids), dtype=np.int64)
    dropped: Counter = Counter()
    notes: Counter = Counter()
    totals = {"samples": 0, "boxes": 0, "crowd": 0}
    digest = hashlib.sha256()
    size = 0

    def write(f: BinaryIO) -> None:
        nonlocal size
        sink = _HashingWriter(f, digest)
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(task.num_images):
                sample = _make_sample(task, i, images, known, settings, dropped, notes)
                if sample is None:
                    continue
                key, jpeg, meta = sample
                _add_member(tar, f"{key}.jpg", jpeg)
                _add_member(tar, f"{key}.json", json.dumps(meta, separators=(",", ":")).encode())
                totals["samples"] += 1
                totals["boxes"] += len(meta["boxes"])
                totals["crowd"] += int(sum(meta["iscrowd"]))
        size = sink.size

    out.write_atomic(task.name, write)
    record = {
        "name": task.name, "samples": totals["samples"], "boxes": totals["boxes"],
        "crowd_boxes": totals["crowd"], "bytes": size, "sha256": digest.hexdigest(),
        "digest": task.digest, "dropped": dict(dropped), "notes": dict(notes),
        "format_version": SAMPLE_FORMAT_VERSION,
    }
    out.write_bytes(sidecar_name(task.name), json.dumps(record, indent=1).encode())
    return {**record, "status": "written", "seconds": time.perf_counter() - start}


class _HashingWriter:
    """File-like sink that hashes and counts what tarfile writes through it."""

    def __init__(self, f: BinaryIO, digest: Any) -> None:
        self.f, self.digest, self.size = f, digest, 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.f.write(data)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444  # fixed metadata: reproducible bytes
    tar.addfile(info, io.BytesIO(data))


def _make_sample(
    task: ShardTask, i: int, images: Storage, known: np.ndarray, settings: WriterSettings,
    dropped: Counter, notes: Counter,
) -> tuple[str, bytes, dict[str, Any]] | None:
    file_name = task.file_names[i]
    if not is_safe_relative_name(file_name):
        dropped["unsafe_file_name"] += 1
        return None
    try:
        data = images.read_bytes(file_name)
    except FileNotFoundError:
        dropped["missing_image"] += 1
        return None
    except (PermissionError, IsADirectoryError):
        dropped["unreadable_image"] += 1
        return None
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        fmt = image.format
        scale = 1.0
        if settings.max_side and max(width, height) > settings.max_side:
            scale = settings.max_side / max(width, height)
        if scale < 1.0 or fmt != "JPEG":
            new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
            data = _reencode(image, new_size, settings.jpeg_quality)
            notes["reencoded"] += 1
        else:
            image.draft("RGB", (max(1, width // 8), max(1, height // 8)))  # cheap full-stream decode
            image.load()
            new_size = (width, height)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        dropped["unreadable_image"] += 1
        return None
    ann_w, ann_h = int(task.widths[i]), int(task.heights[i])
    if (ann_w, ann_h) != (width, height) and ann_w > 0 and ann_h > 0:
        notes["size_mismatch"] += 1  # boxes are clipped to the real image below

    lo, hi = int(task.ann_start[i]), int(task.ann_start[i + 1])
    boxes = task.boxes[lo:hi].copy()
    cats = task.category_ids[lo:hi].astype(np.int64)
    crowd = task.iscrowd[lo:hi]
    keep = np.isfinite(boxes).all(axis=1)
    dropped["nonfinite_box"] += int((~keep).sum())
    known_cat = np.isin(cats, known)
    dropped["unknown_category"] += int((keep & ~known_cat).sum())
    keep &= known_cat
    boxes, cats, crowd = boxes[keep], cats[keep], crowd[keep]
    boxes, valid, clipped = _clip_boxes(boxes, width, height)
    dropped["degenerate_box"] += int((~valid).sum())
    notes["clipped_box"] += int((clipped & valid).sum())
    boxes, cats, crowd = boxes[valid], cats[valid], crowd[valid]
    if new_size != (width, height):
        boxes = boxes * np.array([new_size[0] / width, new_size[1] / height] * 2)
    key = str(int(task.image_ids[i]))
    meta = {
        "image_id": int(task.image_ids[i]), "file_name": file_name,
        "orig_size": [height, width], "size": [new_size[1], new_size[0]],
        "boxes": boxes.tolist(), "category_ids": cats.tolist(), "iscrowd": crowd.astype(int).tolist(),
    }
    return key, data, meta


def _clip_boxes(boxes: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clip xywh boxes to the image; values of boxes already inside are kept bit-exact."""
    x1, y1 = boxes[:, 0], boxes[:, 1]
    x2, y2 = x1 + boxes[:, 2], y1 + boxes[:, 3]
    cx1, cy1 = np.clip(x1, 0, width), np.clip(y1, 0, height)
    cx2, cy2 = np.clip(x2, 0, width), np.clip(y2, 0, height)
    clipped = (cx1 != x1) | (cy1 != y1) | (cx2 != x2) | (cy2 != y2)
    valid = (cx2 > cx1) & (cy2 > cy1) & (boxes[:, 2] > 0) & (boxes[:, 3] > 0)
    out = boxes.copy()
    out[clipped] = np.stack([cx1, cy1, cx2 - cx1, cy2 - cy1], axis=1)[clipped]
    return out, valid, clipped


def _reencode(image: Image.Image, size: tuple[int, int], quality: int) -> bytes:
    image.draft("RGB", size)
    image = image.convert("RGB")
    if image.size != size:
        image = image.resize(size, Image.BICUBIC, reducing_gap=3.0)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
