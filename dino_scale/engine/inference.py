"""Single-image inference and drawing detections (launch/infer.py, the demo picture)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from dino_scale.config import Config
from dino_scale.data.categories import read_categories
from dino_scale.data.collate import collate
from dino_scale.data.transforms import build_eval_transform
from dino_scale.io import atomic_write_bytes
from dino_scale.models import PostProcess
from dino_scale.weights.safetensors import read_metadata


@torch.no_grad()
def detect(model: nn.Module, image_path: str | Path, cfg: Config) -> dict[str, torch.Tensor]:
    """`scores [K]`, `labels [K]`, `boxes [K, 4]` (absolute xyxy in the original image)."""
    image = Image.open(image_path).convert("RGB")
    target = {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros((0,), np.int64),
              "image_id": 0, "orig_size": [image.height, image.width]}
    tensor, target = build_eval_transform(cfg.data)(image, target)
    batch = collate([(tensor, target)])
    device = next(model.parameters()).device
    model.eval()
    outputs = model(batch.images.to(device), batch.masks.to(device))
    sizes = torch.tensor([[image.height, image.width]], device=device)
    return PostProcess(cfg.model.num_select)(outputs, sizes)[0]


def names_for(checkpoint: str | Path, categories_file: str | Path | None) -> dict[int, str]:
    """Category id -> name from a COCO JSON/manifest, else from the export's metadata."""
    cats: list[dict[str, Any]] | None = None
    if categories_file:
        cats = read_categories(categories_file)
    elif str(checkpoint).endswith(".safetensors"):
        cats = read_metadata(checkpoint).get("categories")
    return {c["id"]: c["name"] for c in cats or []}


def draw_detections(image_path: str | Path, detections: dict[str, torch.Tensor], out_path: str | Path,
                    *, threshold: float, names: dict[int, str] | None = None, scale: float = 1.0) -> list[dict]:
    """Draw boxes scoring >= threshold on the image, enlarged `scale` times so that labels
    stay legible on small images, and save a PNG; returns what was drawn (boxes in the
    image's own pixels)."""
    image = Image.open(image_path).convert("RGB")
    if scale != 1.0:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    palette = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
               (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]
    kept = []
    for score, label, box in zip(detections["scores"].tolist(), detections["labels"].tolist(),
                                 detections["boxes"].tolist()):
        if score < threshold:
            continue
        color = palette[label % len(palette)]
        shown = [c * scale for c in box]
        draw.rectangle(shown, outline=color, width=2)
        text = f"{(names or {}).get(label, label)} {score:.2f}"
        draw.text((shown[0] + 2, shown[1] + 1), text, fill=color)
        kept.append({"label": label, "score": score, "box": box})
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(out_path, buffer.getvalue())
    return kept
