"""Generated detection data for the demo: simple shapes on textured backgrounds.

Two datasets in COCO format (JSON + JPEGs), like the real pair the system is built for:
- "Objects365-like" pretraining set: 8 shape classes (ids 1..8);
- "COCO-like" fine-tuning set (train + val): 5 classes under different ids, 4 of them
  shared BY NAME with the pretraining set and one new (`pentagon`), so the fine-tune
  transfer has rows to copy and rows to start fresh.

Colours are random per object (the class is the shape, not the colour); objects may
overlap a little; backgrounds mix a gradient, stripes and noise so the detector cannot key
on flat colour. Everything is a function of the seed.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from dino_scale.io import atomic_write_text

PRETRAIN_CLASSES = ["circle", "square", "triangle", "diamond", "star", "cross", "hexagon", "ring"]
FINETUNE_CLASSES = ["square", "circle", "triangle", "star", "pentagon"]


@dataclass
class DemoSplit:
    images: Path
    annotations: Path
    num_images: int


def _polygon(kind: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    def regular(n: int, radius: float, offset: float = 0.0) -> list[tuple[float, float]]:
        return [(cx + radius * math.cos(rot + offset + 2 * math.pi * k / n),
                 cy + radius * math.sin(rot + offset + 2 * math.pi * k / n)) for k in range(n)]

    if kind == "triangle":
        return regular(3, r, -math.pi / 2)
    if kind == "square":
        return regular(4, r * 1.2, math.pi / 4)
    if kind == "diamond":
        return [(cx, cy - r), (cx + 0.6 * r, cy), (cx, cy + r), (cx - 0.6 * r, cy)]
    if kind == "pentagon":
        return regular(5, r, -math.pi / 2)
    if kind == "hexagon":
        return regular(6, r)
    if kind == "star":
        outer = regular(5, r, -math.pi / 2)
        inner = regular(5, r * 0.42, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    if kind == "cross":
        a, b = r, r * 0.35
        return [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b),
                (cx + b, cy + b), (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b),
                (cx - a, cy - b), (cx - b, cy - b)]
    raise ValueError(kind)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(60, 200, size=3)
    direction = rng.uniform(-1, 1, size=2)
    gradient = (xx * direction[0] + yy * direction[1])[..., None] * rng.uniform(20, 60)
    freq, angle = rng.uniform(4, 14), rng.uniform(0, math.pi)
    stripes = np.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)))[..., None]
    stripes = stripes * rng.uniform(5, 25)
    noise = rng.normal(0, rng.uniform(4, 14), size=(size, size, 3))
    img = np.clip(base + gradient + stripes + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(img)


def _draw_object(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, rot: float,
                 color: tuple[int, int, int]) -> list[float]:
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        return [cx - r, cy - r, cx + r, cy + r]
    if kind == "ring":
        width = max(2, int(r * 0.35))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, width=width)
        return [cx - r, cy - r, cx + r, cy + r]
    points = _polygon(kind, cx, cy, r, rot)
    draw.polygon(points, fill=color)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return [min(xs), min(ys), max(xs), max(ys)]


def _contrasting_color(rng: np.random.Generator) -> tuple[int, int, int]:
    # saturated colours stand out from the muted backgrounds
    hue = rng.uniform(0, 1)
    k = np.array([5.0, 3.0, 1.0])
    rgb = 1 - np.clip(np.minimum(np.mod(k + hue * 6, 6), 4 - np.mod(k + hue * 6, 6)), 0, 1)
    value = rng.uniform(0.75, 1.0) if rng.random() < 0.7 else rng.uniform(0.05, 0.2)
    return tuple(int(c) for c in (255 * value * (1 - 0.8 * rgb)))


def generate_split(out_dir: Path, classes: list[str], num_images: int, seed: int, *,
                   image_size: int = 128, max_objects: int = 3, min_radius: int = 12,
                   max_radius: int = 30, first_image_id: int = 1) -> DemoSplit:
    """Write `num_images` JPEGs under `out_dir/images` and `out_dir/annotations.json`."""
    rng = np.random.default_rng(seed)
    py_rng = random.Random(seed)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    ann_id = 1
    for index in range(num_images):
        image_id = first_image_id + index
        image = _background(rng, image_size)
        draw = ImageDraw.Draw(image)
        placed: list[list[float]] = []
        for _ in range(py_rng.randint(1, max_objects)):
            for _attempt in range(20):
                r = rng.uniform(min_radius, max_radius)
                cx, cy = rng.uniform(r, image_size - r, size=2)
                box = [cx - r, cy - r, cx + r, cy + r]
                if all(_iou(box, other) < 0.1 for other in placed):
                    break
            else:
                continue
            kind_index = py_rng.randrange(len(classes))
            xyxy = _draw_object(draw, classes[kind_index], cx, cy, r, rng.uniform(0, 2 * math.pi),
                                _contrasting_color(rng))
            x0, y0 = max(0.0, xyxy[0]), max(0.0, xyxy[1])
            x1, y1 = min(float(image_size), xyxy[2]), min(float(image_size), xyxy[3])
            placed.append(box)
            annotations.append({
                "id": ann_id, "image_id": image_id, "category_id": kind_index + 1,
                "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                "area": round((x1 - x0) * (y1 - y0), 2), "iscrowd": 0,
            })
            ann_id += 1
        file_name = f"{image_id:08d}.jpg"
        image.save(images_dir / file_name, quality=92)
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": name} for i, name in enumerate(classes)]}
    ann_path = out_dir / "annotations.json"
    atomic_write_text(ann_path, json.dumps(coco))
    return DemoSplit(images_dir, ann_path, num_images)


def _iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def generate_demo_data(root: str | Path, *, pretrain_images: int = 600, finetune_train_images: int = 300,
                       val_images: int = 100, image_size: int = 128, seed: int = 0) -> dict[str, DemoSplit]:
    """The three splits under `root`: pretrain/, finetune_train/, finetune_val/."""
    root = Path(root)
    common: dict[str, Any] = {"image_size": image_size}
    return {
        "pretrain": generate_split(root / "pretrain", PRETRAIN_CLASSES, pretrain_images, seed, **common),
        "finetune_train": generate_split(root / "finetune_train", FINETUNE_CLASSES, finetune_train_images,
                                         seed + 1, **common),
        "finetune_val": generate_split(root / "finetune_val", FINETUNE_CLASSES, val_images, seed + 2,
                                       first_image_id=1_000_000, **common),
    }
