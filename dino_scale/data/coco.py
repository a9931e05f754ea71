"""Map-style COCO folder dataset (images + COCO JSON, local or s3://) for evaluation and
small fine-tunes, and the evaluation loader split across ranks."""

from __future__ import annotations

import contextlib
import io
import json
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset

from dino_scale.data.collate import Batch, collate
from dino_scale.data.samples import BadSample, augmentation_seed
from dino_scale.data.storage import Storage, filesystem, split_url
from dino_scale.data.transforms import build_eval_transform


def load_coco(annotations: str, storage_options: dict[str, Any] | None = None) -> Any:
    """A pycocotools `COCO` object from a local or s3:// JSON file."""
    fs = filesystem(annotations, storage_options)
    with fs.open(split_url(annotations)[1], "rb") as f:
        data = json.load(f)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


class CocoDetection(Dataset):
    """`dataset[i] -> (image [3, H, W] float32, target)` with `transform(image, target, rng)`.

    Targets carry `labels`, `boxes` (normalised cxcywh after the transform), `iscrowd`,
    `area`, `image_id`, `orig_size`, `size`; crowd boxes are kept unless `drop_crowd`.
    Boxes are clipped to the image; boxes with no area are dropped (as the official code does).
    `seed` + `epoch` seed each image's augmentation RNG (used by random transforms only).
    """

    def __init__(
        self, images: str, annotations: str, transform: Callable, storage_options: dict[str, Any] | None = None,
        drop_crowd: bool = False, seed: int = 0, coco: Any = None,
    ) -> None:
        self.images_root, self.annotations = images, annotations
        self.storage_options = dict(storage_options or {})
        self.coco = coco if coco is not None else load_coco(annotations, storage_options)
        self.ids = sorted(self.coco.imgs)
        self.transform, self.drop_crowd, self.seed, self.epoch = transform, drop_crowd, seed, 0
        self._images = Storage(images, self.storage_options)

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def load(self, index: int) -> tuple[Image.Image, dict[str, Any]]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        image = Image.open(io.BytesIO(self._images.read_bytes(info["file_name"]))).convert("RGB")
        width, height = image.size
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not (self.drop_crowd and a.get("iscrowd", 0))]
        boxes = np.asarray([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        xyxy = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)
        xyxy = np.clip(xyxy, 0, [width, height, width, height])
        keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        target = {
            "boxes": xyxy[keep].astype(np.float32),
            "labels": np.asarray([a["category_id"] for a in anns], dtype=np.int64)[keep],
            "iscrowd": np.asarray([a.get("iscrowd", 0) for a in anns], dtype=np.int64)[keep],
            "area": np.asarray([a.get("area", 0.0) for a in anns], dtype=np.float32)[keep],
            "image_id": image_id, "orig_size": [height, width],
        }
        return image, target

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image, target = self.load(index)
        rng = random.Random(augmentation_seed(self.seed, self.epoch, str(self.ids[index])))
        return self.transform(image, target, rng)


class SkippingCocoDetection(Dataset):
    """Training view of a `CocoDetection`: a missing or undecodable image gives a
    `BadSample` (counted and skipped by the loader) instead of an exception."""

    def __init__(self, dataset: CocoDetection) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except FileNotFoundError as exc:
            return BadSample("missing_image", str(exc))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            return BadSample("undecodable_image", str(exc))


def build_eval_dataset(cfg: Any) -> CocoDetection:
    """`cfg.val_images` + `cfg.val_annotations` with the eval transform (shorter side
    `cfg.eval_size`, longer <= `cfg.eval_max_size`). The ground truth for scoring is
    `dataset.coco` (pycocotools COCO) and its file `dataset.annotations`."""
    if not cfg.val_images or not cfg.val_annotations:
        raise ValueError("data.val_images and data.val_annotations must be set for evaluation")
    return CocoDetection(cfg.val_images, cfg.val_annotations, build_eval_transform(cfg), cfg.storage_options)


def rank_indices(length: int, rank: int, world_size: int) -> list[int]:
    """Indices rank, rank + W, ...: every image exactly once over all ranks (no padding)."""
    return list(range(rank, length, world_size))


def build_eval_loader(
    cfg: Any, *, batch_size: int, rank: int, world_size: int, dataset: CocoDetection | None = None
) -> DataLoader:
    """Eval batches (`Batch`) of this rank's share of `build_eval_dataset(cfg)`; the dataset
    is `loader.dataset` (its `coco` is the ground truth). Ranks get disjoint shares that
    together cover every image once; shares differ in size by at most one image."""
    dataset = dataset if dataset is not None else build_eval_dataset(cfg)
    workers = max(0, cfg.num_workers)
    extra: dict[str, Any] = {}
    if workers > 0:
        extra = {"multiprocessing_context": cfg.multiprocessing_context, "prefetch_factor": cfg.prefetch_factor}
    return DataLoader(
        dataset, batch_size=batch_size, sampler=rank_indices(len(dataset), rank, world_size),
        collate_fn=collate, num_workers=workers, pin_memory=cfg.pin_memory, **extra,
        generator=torch.Generator().manual_seed(0),  # not the global RNG: see loader._data_loader
    )


__all__ = ["Batch", "CocoDetection", "build_eval_dataset", "build_eval_loader", "load_coco"]
