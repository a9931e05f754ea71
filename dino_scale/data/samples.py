"""Decode one raw shard sample (`jpg` + `json` bytes) into (PIL image, target), rejecting
what a detector must not train on. Rejections are `BadSample(reason)`; the loader counts
them by reason."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
from PIL import Image

from dino_scale.data.transforms import Target


class BadSample(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode_sample(raw: dict[str, bytes], drop_crowd: bool) -> tuple[Image.Image, Target]:
    """raw: {"__key__", "jpg", "json"} -> RGB image and a target with xyxy absolute boxes."""
    if "jpg" not in raw or "json" not in raw:
        raise BadSample("incomplete_sample", f"members {sorted(k for k in raw if k != '__key__')}")
    try:
        meta = json.loads(raw["json"])
        boxes = np.asarray(meta["boxes"], dtype=np.float64).reshape(-1, 4)
        labels = np.asarray(meta["category_ids"], dtype=np.int64).reshape(-1)
        iscrowd = np.asarray(meta.get("iscrowd", [0] * len(labels)), dtype=np.int64).reshape(-1)
        size = [int(v) for v in meta["size"]]
        orig_size = [int(v) for v in meta.get("orig_size", size)]
        image_id = int(meta["image_id"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BadSample("bad_json", str(exc)) from None
    if not (len(boxes) == len(labels) == len(iscrowd)):
        raise BadSample("bad_json", "boxes, category_ids and iscrowd differ in length")
    try:
        image = Image.open(io.BytesIO(raw["jpg"]))
        image = image.convert("RGB")  # forces the full decode: truncated data fails here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadSample("undecodable_image", str(exc)) from None
    if [image.height, image.width] != size:
        raise BadSample("size_mismatch", f"json size {size}, image {image.height}x{image.width}")
    xyxy = sanitize_boxes(boxes, image.width, image.height)
    target = {
        "boxes": xyxy.astype(np.float32), "labels": labels, "iscrowd": iscrowd,
        "image_id": image_id, "orig_size": orig_size,
    }
    if drop_crowd:
        keep = iscrowd == 0
        target = {k: (v[keep] if k in ("boxes", "labels", "iscrowd") else v) for k, v in target.items()}
    return image, target


def sanitize_boxes(boxes_xywh: np.ndarray, width: int, height: int) -> np.ndarray:
    """xywh -> xyxy clipped to the image; NaN/inf or non-positive boxes reject the sample."""
    if not np.isfinite(boxes_xywh).all():
        raise BadSample("bad_boxes", "non-finite box coordinates")
    if (boxes_xywh[:, 2:] <= 0).any():
        raise BadSample("bad_boxes", "box with non-positive width or height")
    xyxy = np.concatenate([boxes_xywh[:, :2], boxes_xywh[:, :2] + boxes_xywh[:, 2:]], axis=1)
    xyxy = np.clip(xyxy, 0, [width, height, width, height])
    if ((xyxy[:, 2] <= xyxy[:, 0]) | (xyxy[:, 3] <= xyxy[:, 1])).any():
        raise BadSample("bad_boxes", "box outside the image")
    return xyxy


def augmentation_seed(seed: int, epoch: int, key: str) -> int:
    """A 64-bit seed from (seed, epoch, key), the same in every process and Python run."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")

