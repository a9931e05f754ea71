"""Deterministic shard plan: which image goes to which shard, fixed by a seed."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from data_pipeline.annotation_index import AnnotationIndex


@dataclass
class ShardTask:
    """Everything one Ray task needs to write one shard (small: only its own rows)."""

    index: int
    name: str
    digest: str  # fingerprint of the shard's content plan; a finished shard records it
    image_ids: np.ndarray  # int64 [n]
    file_names: list[str]
    widths: np.ndarray  # int32 [n] (from the annotation file)
    heights: np.ndarray
    ann_start: np.ndarray  # int64 [n + 1], into the arrays below
    boxes: np.ndarray  # float64 [a, 4] xywh
    category_ids: np.ndarray  # int32 [a]
    iscrowd: np.ndarray  # uint8 [a]

    @property
    def num_images(self) -> int:
        return int(self.image_ids.shape[0])


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def plan_shards(
    index: AnnotationIndex,
    samples_per_shard: int,
    seed: int,
    prefix: str = "shard",
    settings_fingerprint: dict[str, Any] | None = None,
    limit: int | None = None,
) -> list[ShardTask]:
    """Shuffle image rows with `seed` and cut them into shards of `samples_per_shard`.

    Images are sorted by id in the index, so the plan does not depend on the order of
    the annotation file. `limit` keeps only the first images of the shuffled order.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    rows = np.random.default_rng(seed).permutation(index.num_images)
    if limit is not None:
        rows = rows[:limit]
    settings = json.dumps(settings_fingerprint or {}, sort_keys=True).encode()
    tasks = []
    for shard, start in enumerate(range(0, rows.shape[0], samples_per_shard)):
        chunk = rows[start : start + samples_per_shard]
        tasks.append(_task(index, shard, shard_name(prefix, shard), chunk, settings))
    return tasks


def _task(index: AnnotationIndex, shard: int, name: str, rows: np.ndarray, settings: bytes) -> ShardTask:
    starts, ends = index.ann_start[rows], index.ann_start[rows + 1]
    ann_rows = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]) if rows.size else np.zeros(0, np.int64)
    ann_start = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)
    image_ids = index.image_ids[rows]
    digest = hashlib.sha256()
    digest.update(settings)
    digest.update(image_ids.astype("<i8").tobytes())
    boxes = index.boxes[ann_rows]
    category_ids = index.category_ids[ann_rows]
    iscrowd = index.iscrowd[ann_rows]
    for array in (ann_start, boxes, category_ids, iscrowd):
        digest.update(np.ascontiguousarray(array).tobytes())
    return ShardTask(
        index=shard, name=name, digest=digest.hexdigest(), image_ids=image_ids,
        file_names=[index.file_name(int(r)) for r in rows],
        widths=index.widths[rows], heights=index.heights[rows], ann_start=ann_start,
        boxes=boxes, category_ids=category_ids, iscrowd=iscrowd,
    )
