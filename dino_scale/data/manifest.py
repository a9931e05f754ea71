"""The manifest: written last, it is the proof that a shard set is complete."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from dino_scale.data.storage import Storage

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
SHARD_FIELDS = ("name", "samples", "boxes", "crowd_boxes", "bytes", "sha256")


def build_manifest(
    records: list[dict[str, Any]], categories: list[dict[str, Any]], settings: dict[str, Any],
    index_dropped: dict[str, int],
) -> dict[str, Any]:
    records = sorted(records, key=lambda r: r["name"])
    dropped: Counter = Counter(index_dropped)
    notes: Counter = Counter()
    for record in records:
        dropped.update(record.get("dropped", {}))
        notes.update(record.get("notes", {}))
    return {
        "version": MANIFEST_VERSION,
        "shards": [{k: r[k] for k in SHARD_FIELDS} for r in records],
        "totals": {
            "shards": len(records),
            "samples": sum(r["samples"] for r in records),
            "boxes": sum(r["boxes"] for r in records),
            "crowd_boxes": sum(r["crowd_boxes"] for r in records),
            "bytes": sum(r["bytes"] for r in records),
        },
        "dropped": {k: v for k, v in sorted(dropped.items()) if v},
        "notes": {k: v for k, v in sorted(notes.items()) if v},
        "categories": categories,
        "settings": settings,
    }


def write_manifest(out: Storage, manifest: dict[str, Any]) -> None:
    out.write_bytes(MANIFEST_NAME, json.dumps(manifest, indent=1).encode())


def read_manifest(root: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load `root/manifest.json` (or `root` itself when it names a .json file)."""
    if str(root).endswith(".json"):
        directory, _, name = str(root).rstrip("/").rpartition("/")
        storage = Storage(directory or ".", storage_options)
    else:
        storage, name = Storage(root, storage_options), MANIFEST_NAME
    try:
        data = json.loads(storage.read_bytes(name))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no {name} under {root}: the shard build did not finish (the manifest is written "
            "last); re-run `python -m data_pipeline.build_shards` with the same arguments to resume"
        ) from None
    if data.get("version") != MANIFEST_VERSION or "shards" not in data:
        raise ValueError(f"{root}: not a dino-scale shard manifest (version {data.get('version')!r})")
    return data


def shard_root(root: str) -> str:
    """Directory/prefix holding the shards, given that directory or its manifest path."""
    root = str(root)
    return root.rstrip("/").rpartition("/")[0] if root.endswith(".json") else root.rstrip("/")
