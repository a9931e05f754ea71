"""Small generated COCO-format datasets for the shard and loader tests (fast to decode)."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CATEGORIES = [{"id": i, "name": f"class{i}"} for i in (1, 2, 3, 5, 8)]


def jpeg_bytes(width: int, height: int, boxes: list[list[float]], seed: int) -> bytes:
    """Dark noisy background with each box painted as a bright filled rectangle."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 40, size=(height, width, 3), dtype=np.uint8)
    for x, y, w, h in boxes:
        pixels[int(y) : int(y + h), int(x) : int(x + w)] = 230
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def make_coco(root: Path, num_images: int = 40, seed: int = 0, id_base: int = 1000) -> dict[str, Any]:
    """Write `root/images/*.jpg` and `root/annotations.json`; returns the JSON dict."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    ann_id = 1
    for i in range(num_images):
        width, height = rng.randint(48, 96), rng.randint(40, 80)
        image_id = id_base + 7 * i
        boxes = []
        for _ in range(rng.randint(0, 3)):
            w, h = rng.randint(6, width // 2), rng.randint(6, height // 2)
            x, y = rng.randint(0, width - w), rng.randint(0, height - h)
            boxes.append([float(x), float(y), float(w), float(h)])
            annotations.append({
                "id": ann_id, "image_id": image_id, "bbox": [float(x), float(y), float(w), float(h)],
                "category_id": rng.choice(CATEGORIES)["id"], "iscrowd": int(rng.random() < 0.1),
                "area": float(w * h), "segmentation": [],
            })
            ann_id += 1
        name = f"img_{image_id}.jpg"
        (root / "images" / name).write_bytes(jpeg_bytes(width, height, boxes, seed * 100003 + i))
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
    data = {"info": {"description": "synthetic"}, "images": images, "annotations": annotations,
            "categories": CATEGORIES}
    (root / "annotations.json").write_text(json.dumps(data))
    return data


def annotations_by_image(data: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {img["id"]: [] for img in data["images"]}
    for ann in data["annotations"]:
        out[ann["image_id"]].append(ann)
    return out


def build_shards_inline(src: Path, out: str, samples_per_shard: int, seed: int = 0,
                        storage_options: dict[str, Any] | None = None, annotations: Path | None = None,
                        images: Path | None = None) -> dict[str, Any]:
    """The builder's plan + writer + manifest without Ray (fast fixture for loader tests)."""
    from data_pipeline.annotation_index import load_annotation_index
    from data_pipeline.plan import plan_shards
    from data_pipeline.writer import WriterSettings, write_shard
    from dino_scale.data.manifest import build_manifest, write_manifest
    from dino_scale.data.storage import Storage

    index = load_annotation_index(str(annotations or src / "annotations.json"))
    settings = WriterSettings(images_root=str(images or src / "images"), output_root=out,
                              known_category_ids=[c["id"] for c in index.categories],
                              output_storage_options=storage_options or {})
    records = [write_shard(task, settings) for task in plan_shards(index, samples_per_shard, seed)]
    manifest = build_manifest(records, index.categories, {"seed": seed}, dict(index.dropped))
    write_manifest(Storage(out, storage_options), manifest)
    return manifest
