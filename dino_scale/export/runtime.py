"""Running an exported detector with ONNX Runtime (CPU), and the preprocessing it expects."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image

from dino_scale.config import Config, config_from_tree
from dino_scale.data.collate import collate
from dino_scale.data.transforms import build_eval_transform
from dino_scale.errors import UserError

CONFIG_KEY = "dino_scale.config"
CATEGORIES_KEY = "dino_scale.categories"


class OnnxDetector:
    """An exported DINO in an ONNX Runtime session:
    `detector(images, masks, orig_sizes)` -> {"scores" [B, K], "labels" [B, K], "boxes" [B, K, 4]}
    as numpy arrays (the graph's outputs, see dino_scale.export.graph).

    A graph exported at a fixed size (`fixed_size`, (H, W); None when symbolic) takes smaller
    inputs padded up to it (zeros, mask True), as a batch is padded to its largest image."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.metadata: dict[str, str] = self.session.get_modelmeta().custom_metadata_map
        dims = next(i for i in self.session.get_inputs() if i.name == "images").shape
        self.fixed_size: tuple[int, int] | None = (
            (dims[2], dims[3]) if isinstance(dims[2], int) and isinstance(dims[3], int) else None)

    def __call__(self, images: torch.Tensor | np.ndarray, masks: torch.Tensor | np.ndarray,
                 orig_sizes: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
        images, masks = _numpy(images).astype(np.float32), _numpy(masks).astype(bool)
        if self.fixed_size is not None:
            images, masks = pad_to(images, masks, self.fixed_size)
        feeds = {"images": images, "masks": masks, "orig_sizes": _numpy(orig_sizes).astype(np.int64)}
        scores, labels, boxes = self.session.run(["scores", "labels", "boxes"], feeds)
        return {"scores": scores, "labels": labels, "boxes": boxes}

    def config(self, overrides: Sequence[str] = ()) -> Config:
        """The resolved config the model was exported with (its eval transform, threshold),
        with `key.sub=value` overrides on top."""
        if CONFIG_KEY not in self.metadata:
            raise ValueError("the ONNX file has no dino_scale.config metadata; pass --config")
        return config_from_tree(json.loads(self.metadata[CONFIG_KEY]), overrides)

    def category_names(self) -> dict[int, str]:
        cats: list[dict[str, Any]] = json.loads(self.metadata.get(CATEGORIES_KEY, "[]"))
        return {c["id"]: c["name"] for c in cats}


def detect_onnx(detector: OnnxDetector, image_path: str | Path, cfg: Config) -> dict[str, torch.Tensor]:
    """`scores [K]`, `labels [K]`, `boxes [K, 4]` (absolute xyxy in the original image), with
    the same preprocessing as `dino_scale.engine.inference.detect`."""
    image = Image.open(image_path).convert("RGB")
    target = {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros((0,), np.int64),
              "image_id": 0, "orig_size": [image.height, image.width]}
    tensor, target = build_eval_transform(cfg.data)(image, target)
    batch = collate([(tensor, target)])
    out = detector(batch.images, batch.masks, np.array([[image.height, image.width]], np.int64))
    return {k: torch.from_numpy(v[0]) for k, v in out.items()}


def pad_to(images: np.ndarray, masks: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """images [B, 3, h, w] and masks [B, h, w] padded at the bottom/right to `size` (H, W)."""
    (height, width), (h, w) = size, images.shape[-2:]
    if h > height or w > width:
        raise UserError(f"input {h}x{w} is larger than the {height}x{width} the ONNX graph was exported at: "
                         "lower data.eval_size/eval_max_size or export at a larger --height/--width")
    pad = ((0, 0), (0, height - h), (0, width - w))
    return np.pad(images, ((0, 0),) + pad), np.pad(masks, pad, constant_values=True)


def _numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
