"""DETR/DINO transforms keep boxes on their objects; eval transform; collate masks."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from dino_scale.data.collate import collate
from dino_scale.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    TrainTransform,
    crop,
    hflip,
    normalize,
    resize,
    resized_hw,
)


def target(boxes, labels=None):
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.arange(1, len(boxes) + 1) if labels is None else np.asarray(labels)
    return {"boxes": boxes, "labels": labels, "iscrowd": np.zeros(len(boxes), np.int64),
            "image_id": 5, "orig_size": [0, 0]}


def painted(width, height, boxes_xyxy):
    pixels = np.zeros((height, width, 3), np.uint8)
    for x1, y1, x2, y2 in boxes_xyxy:
        pixels[int(y1):int(y2), int(x1):int(x2)] = 255
    return Image.fromarray(pixels)


@pytest.mark.parametrize("hw,size,max_size,expected", [
    ((480, 640), 800, 1333, (800, 1066)),
    ((640, 480), 800, 1333, (1066, 800)),
    ((500, 2000), 800, 1333, (333, 1332)),  # longer side capped
    ((800, 1000), 800, None, (800, 1000)),
    ((427, 640), 480, 1333, (480, 719)),
])
def test_resized_hw_follows_the_official_rule(hw, size, max_size, expected):
    assert resized_hw(*hw, size, max_size) == expected


def test_hflip_mirrors_boxes_and_pixels():
    image = painted(100, 50, [[10, 5, 30, 20]])
    flipped, t = hflip(image, target([[10, 5, 30, 20]]))
    assert t["boxes"].tolist() == [[70, 5, 90, 20]]
    assert np.array_equal(np.asarray(flipped), np.asarray(image)[:, ::-1])


def test_resize_scales_boxes_by_the_size_ratio():
    image, t = resize(painted(640, 480, []), target([[64, 48, 320, 240]]), 800, 1333)
    assert image.size == (1066, 800)
    np.testing.assert_allclose(t["boxes"], [[64 * 1066 / 640, 48 * 800 / 480, 320 * 1066 / 640, 240 * 800 / 480]],
                               rtol=1e-6)


def test_crop_clips_and_removes_boxes_consistently():
    boxes = [[0, 0, 10, 10], [50, 50, 70, 80], [90, 90, 99, 99]]
    image, t = crop(painted(100, 100, []), {**target(boxes, [7, 8, 9]), "area": np.ones(3, np.float32)}, 40, 45, 30, 40)
    assert image.size == (40, 30)
    assert t["boxes"].tolist() == [[5, 10, 25, 30]] and t["labels"].tolist() == [8]
    assert t["iscrowd"].tolist() == [0] and t["area"].tolist() == [400]


def test_normalize_gives_imagenet_stats_and_normalised_cxcywh():
    mean = tuple(int(round(m * 255)) for m in IMAGENET_MEAN)
    image = Image.new("RGB", (40, 20), mean)
    tensor, t = normalize(image, target([[4, 2, 24, 12]]))
    assert tensor.shape == (3, 20, 40) and tensor.dtype == torch.float32
    assert tensor.abs().max() < 0.01
    white = normalize(Image.new("RGB", (2, 2), (255, 255, 255)), target([]))[0]
    torch.testing.assert_close(white[:, 0, 0], (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD))
    torch.testing.assert_close(t["boxes"], torch.tensor([[14 / 40, 7 / 20, 20 / 40, 10 / 20]]))
    assert t["size"].tolist() == [20, 40] and t["labels"].dtype == torch.int64 and t["image_id"].item() == 5


def _pixel_boxes(t):
    h, w = t["size"].tolist()
    cx, cy, bw, bh = t["boxes"].unbind(-1)
    return torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1)


def test_train_augmentation_keeps_every_box_on_its_object():
    """Bright rectangles on black: after flip/resize/crop each box still frames bright pixels
    and the pixels just outside a lone box are dark."""
    boxes = [[20, 30, 120, 110], [300, 200, 420, 300], [500, 40, 620, 160]]
    image = painted(640, 480, boxes)
    transform = TrainTransform([480, 512, 544, 576, 608, 640], 1333)
    flips = 0
    seen_crop = False
    for seed in range(40):
        tensor, t = transform(image, target(boxes), random.Random(seed))
        gray = (tensor * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)).mean(0)
        assert list(gray.shape) == t["size"].tolist()
        seen_crop |= len(t["labels"]) < 3 or min(t["size"].tolist()) < 480
        for label, (x1, y1, x2, y2) in zip(t["labels"].tolist(), _pixel_boxes(t).tolist()):
            inner = gray[int(y1) + 2 : int(y2) - 2, int(x1) + 2 : int(x2) - 2]
            if inner.numel():
                assert inner.mean() > 0.9, (seed, label)
            if y2 - y1 > 6 and x1 > 3:  # left neighbour column is background
                assert gray[int(y1) + 2 : int(y2) - 2, max(0, int(x1) - 3)].mean() < 0.1, (seed, label)
        flips += int(t["labels"].tolist()[:1] == [1] and _pixel_boxes(t)[0, 0] > t["size"][1] / 2)
    assert flips > 0 and seen_crop


def test_train_augmentation_is_a_function_of_its_rng():
    image = painted(200, 150, [[10, 10, 60, 60]])
    transform = TrainTransform([96, 128], 200, [64, 80], 48, 64)
    a = transform(image, target([[10, 10, 60, 60]]), random.Random(1))
    b = transform(image, target([[10, 10, 60, 60]]), random.Random(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
    shapes = {tuple(transform(image, target([[10, 10, 60, 60]]), random.Random(s))[0].shape) for s in range(20)}
    assert len(shapes) > 2


def test_eval_transform_resizes_shorter_side_to_800():
    tensor, t = EvalTransform()(painted(640, 480, []), target([[64, 48, 320, 240]]))
    assert tensor.shape == (3, 800, 1066) and t["size"].tolist() == [800, 1066]
    torch.testing.assert_close(t["boxes"], torch.tensor([[0.3, 0.3, 0.4, 0.4]]), atol=1e-3, rtol=0)


def test_collate_pads_with_zeros_and_masks_the_padding():
    a = torch.ones(3, 4, 6)
    b = torch.full((3, 5, 2), 2.0)
    batch = collate([(a, {"x": torch.tensor(1)}), (b, {"x": torch.tensor(2)})])
    assert batch.images.shape == (2, 3, 5, 6) and batch.masks.shape == (2, 5, 6)
    assert torch.equal(batch.images[0, :, :4, :6], a) and batch.images[0, :, 4:].abs().sum() == 0
    assert torch.equal(batch.images[1, :, :5, :2], b) and batch.images[1, :, :, 2:].abs().sum() == 0
    assert batch.masks[0].sum() == 6 and not batch.masks[0, :4, :6].any()
    assert batch.masks[1].sum() == 20 and not batch.masks[1, :5, :2].any()
    assert [t["x"].item() for t in batch.targets] == [1, 2]
