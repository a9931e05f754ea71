"""The category list `[{"id", "name"}]` of a dataset: from a COCO annotation JSON or a shard
`manifest.json` (local or s3://)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fsspec

from dino_scale.config import DataConfig
from dino_scale.data.manifest import MANIFEST_NAME
from dino_scale.log import get_logger

log = get_logger(__name__)


def read_categories(path: str | Path) -> list[dict[str, Any]]:
    """`[{"id", "name"}]` from a COCO annotation JSON or a shard `manifest.json`."""
    with fsspec.open(str(path), "rt") as f:
        data = json.load(f)
    cats = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(cats, list) or not all("id" in c and "name" in c for c in cats):
        raise ValueError(f"{path}: no 'categories' list of {{id, name}} found")
    return [{"id": int(c["id"]), "name": str(c["name"])} for c in cats]


def dataset_categories(data_cfg: DataConfig) -> list[dict[str, Any]] | None:
    """Categories of the training data named by a `DataConfig` (manifest or COCO JSON)."""
    candidates = []
    if data_cfg.train_shards:
        shards = str(data_cfg.train_shards)
        candidates.append(shards if shards.endswith(".json") else shards.rstrip("/") + "/" + MANIFEST_NAME)
    for ann in (data_cfg.train_coco_annotations, data_cfg.val_annotations):
        if ann:
            candidates.append(ann)
    for candidate in candidates:
        try:
            return read_categories(candidate)
        except (OSError, ValueError, KeyError) as exc:
            log.debug("no categories in %s: %s", candidate, exc)
    return None
