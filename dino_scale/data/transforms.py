"""DETR/DINO detection transforms on (PIL image, target) pairs.

Targets hold `boxes` as float32 numpy `[n, 4]` absolute xyxy in the current image's pixels
plus per-box `labels` and `iscrowd`; `normalize` ends the chain, turning the image into an
ImageNet-normalised float32 tensor `[3, H, W]` and the boxes into normalised cxcywh.
Every random choice draws from the `random.Random` passed in, which the loader seeds from
(seed, epoch, sample key): augmentation does not depend on worker scheduling.

Training (official DETR/DINO recipe): horizontal flip (p=0.5), then with p=0.5 either a
multi-scale resize (shorter side from `train_scales`, longer side <= `train_max_size`) or
resize (shorter side from `crop_scales`) -> random size crop (`crop_min_size`..`crop_max_size`)
-> the same multi-scale resize. Evaluation: shorter side `eval_size`, longer <= `eval_max_size`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PER_BOX_KEYS = ("boxes", "labels", "iscrowd", "area")

Target = dict[str, Any]
Transform = Callable[[Image.Image, Target, random.Random], tuple[Image.Image, Target]]


def resized_hw(height: int, width: int, size: int, max_size: int | None) -> tuple[int, int]:
    """Output (h, w) with the shorter side `size`, shrunk so the longer side stays <= max_size."""
    if max_size is not None:
        short, long = min(height, width), max(height, width)
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def _filter(target: Target, keep: np.ndarray) -> Target:
    return {k: (v[keep] if k in PER_BOX_KEYS else v) for k, v in target.items()}


def hflip(image: Image.Image, target: Target) -> tuple[Image.Image, Target]:
    width = image.width
    boxes = target["boxes"].copy()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), {**target, "boxes": boxes}


def resize(image: Image.Image, target: Target, size: int, max_size: int | None) -> tuple[Image.Image, Target]:
    height, width = image.height, image.width
    new_h, new_w = resized_hw(height, width, size, max_size)
    if (new_h, new_w) == (height, width):
        return image, target
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    scale = np.array([new_w / width, new_h / height] * 2, dtype=np.float32)
    out = {**target, "boxes": (target["boxes"] * scale).astype(np.float32)}
    if "area" in target:
        out["area"] = target["area"] * (new_w / width) * (new_h / height)
    return image, out


def crop(image: Image.Image, target: Target, top: int, left: int, height: int, width: int
         ) -> tuple[Image.Image, Target]:
    """Crop; boxes are shifted and clipped, and boxes left with no area are removed."""
    image = image.crop((left, top, left + width, top + height))
    boxes = target["boxes"] - np.array([left, top, left, top], dtype=np.float32)
    boxes = np.minimum(np.maximum(boxes, 0), np.array([width, height, width, height], dtype=np.float32))
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    out = _filter({**target, "boxes": boxes.astype(np.float32)}, keep)
    if "area" in out:
        out["area"] = (out["boxes"][:, 2] - out["boxes"][:, 0]) * (out["boxes"][:, 3] - out["boxes"][:, 1])
    return image, out


def random_size_crop(
    image: Image.Image, target: Target, rng: random.Random, min_size: int, max_size: int
) -> tuple[Image.Image, Target]:
    width = rng.randint(min(min_size, image.width), min(image.width, max_size))
    height = rng.randint(min(min_size, image.height), min(image.height, max_size))
    top = rng.randint(0, image.height - height)
    left = rng.randint(0, image.width - width)
    return crop(image, target, top, left, height, width)


def normalize(image: Image.Image, target: Target) -> tuple[torch.Tensor, Target]:
    """uint8 PIL -> float32 [3, H, W] (ImageNet mean/std); boxes -> normalised cxcywh tensors."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    tensor = torch.from_numpy(array).permute(2, 0, 1).div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    tensor = tensor.sub_(mean).div_(std).contiguous()
    height, width = image.height, image.width
    boxes = target["boxes"].astype(np.float32).reshape(-1, 4)
    cxcywh = np.stack(
        [(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2,
         boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1
    ) / np.array([width, height, width, height], dtype=np.float32)
    out: Target = {
        "labels": torch.as_tensor(np.asarray(target["labels"]), dtype=torch.int64),
        "boxes": torch.from_numpy(cxcywh.astype(np.float32)),
        "image_id": torch.tensor(int(target["image_id"]), dtype=torch.int64),
        "orig_size": torch.as_tensor(target["orig_size"], dtype=torch.int64),
        "size": torch.tensor([height, width], dtype=torch.int64),
    }
    if "iscrowd" in target:
        out["iscrowd"] = torch.as_tensor(np.asarray(target["iscrowd"]), dtype=torch.int64)
    if "area" in target:
        out["area"] = torch.as_tensor(np.asarray(target["area"]), dtype=torch.float32)
    return tensor, out


class TrainTransform:
    """The official DETR/DINO training augmentation; `rng` supplies every random choice."""

    def __init__(
        self, scales: list[int], max_size: int = 1333, crop_scales: list[int] = (400, 500, 600),
        crop_min_size: int = 384, crop_max_size: int = 600, flip_prob: float = 0.5,
    ) -> None:
        self.scales, self.max_size = list(scales), max_size
        self.crop_scales, self.crop_min_size, self.crop_max_size = list(crop_scales), crop_min_size, crop_max_size
        self.flip_prob = flip_prob

    def __call__(self, image: Image.Image, target: Target, rng: random.Random) -> tuple[torch.Tensor, Target]:
        if rng.random() < self.flip_prob:
            image, target = hflip(image, target)
        if rng.random() < 0.5:
            image, target = resize(image, target, rng.choice(self.scales), self.max_size)
        else:
            image, target = resize(image, target, rng.choice(self.crop_scales), None)
            image, target = random_size_crop(image, target, rng, self.crop_min_size, self.crop_max_size)
            image, target = resize(image, target, rng.choice(self.scales), self.max_size)
        return normalize(image, target)


class EvalTransform:
    def __init__(self, size: int = 800, max_size: int = 1333) -> None:
        self.size, self.max_size = size, max_size

    def __call__(self, image: Image.Image, target: Target, rng: random.Random | None = None
                 ) -> tuple[torch.Tensor, Target]:
        image, target = resize(image, target, self.size, self.max_size)
        return normalize(image, target)


def build_train_transform(cfg: Any) -> TrainTransform:
    return TrainTransform(cfg.train_scales, cfg.train_max_size, cfg.crop_scales, cfg.crop_min_size, cfg.crop_max_size)


def build_eval_transform(cfg: Any) -> EvalTransform:
    return EvalTransform(cfg.eval_size, cfg.eval_max_size)
