"""The demo's generated datasets: valid COCO, deterministic, partly shared label names."""

from __future__ import annotations

import json

from PIL import Image

from demo_data import FINETUNE_CLASSES, PRETRAIN_CLASSES, generate_demo_data
from dino_scale.data.categories import read_categories
from dino_scale.weights.transfer import class_row_mapping


def test_generated_splits_are_valid_coco(tmp_path):
    splits = generate_demo_data(tmp_path, pretrain_images=12, finetune_train_images=6, val_images=4,
                                image_size=96, seed=3)
    for name, split in splits.items():
        coco = json.loads(split.annotations.read_text())
        assert len(coco["images"]) == split.num_images
        ids = {im["id"] for im in coco["images"]}
        cat_ids = {c["id"] for c in coco["categories"]}
        assert coco["annotations"], name
        for ann in coco["annotations"]:
            x, y, w, h = ann["bbox"]
            assert ann["image_id"] in ids and ann["category_id"] in cat_ids
            assert w > 4 and h > 4 and x >= 0 and y >= 0 and x + w <= 96.01 and y + h <= 96.01
        for im in coco["images"]:
            with Image.open(split.images / im["file_name"]) as img:
                assert img.size == (im["width"], im["height"]) == (96, 96)
    val_ids = {im["id"] for im in json.loads(splits["finetune_val"].annotations.read_text())["images"]}
    train_ids = {im["id"] for im in json.loads(splits["finetune_train"].annotations.read_text())["images"]}
    assert not val_ids & train_ids


def test_generation_is_deterministic(tmp_path):
    a = generate_demo_data(tmp_path / "a", pretrain_images=3, finetune_train_images=2, val_images=2, seed=7)
    b = generate_demo_data(tmp_path / "b", pretrain_images=3, finetune_train_images=2, val_images=2, seed=7)
    assert a["pretrain"].annotations.read_text() == b["pretrain"].annotations.read_text()
    first = sorted(a["finetune_val"].images.iterdir())[0]
    assert first.read_bytes() == (b["finetune_val"].images / first.name).read_bytes()


def test_label_sets_share_some_names_under_other_ids(tmp_path):
    splits = generate_demo_data(tmp_path, pretrain_images=2, finetune_train_images=2, val_images=1)
    source = read_categories(splits["pretrain"].annotations)
    target = read_categories(splits["finetune_train"].annotations)
    mapping = class_row_mapping(source, target, len(PRETRAIN_CLASSES) + 1, len(FINETUNE_CLASSES) + 1)
    shared = set(PRETRAIN_CLASSES) & set(FINETUNE_CLASSES)
    assert 0 < len(mapping) == len(shared) < len(FINETUNE_CLASSES)
    assert any(dst != src for dst, src in mapping.items())  # same names, different ids
