"""COCO folder dataset (local and s3://) and the rank-split eval loader on coco-mini."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from dino_scale.config import DataConfig
from dino_scale.data import build_eval_dataset, build_eval_loader


def eval_cfg(coco_mini, **overrides) -> DataConfig:
    return DataConfig(val_images=str(coco_mini / "train2017"),
                      val_annotations=str(coco_mini / "annotations" / "instances_train2017.json"),
                      num_workers=0, eval_size=200, eval_max_size=333, **overrides)


def test_eval_dataset_keeps_crowd_and_matches_annotations(coco_mini):
    dataset = build_eval_dataset(eval_cfg(coco_mini))
    raw = json.loads((coco_mini / "annotations" / "instances_train2017.json").read_text())
    assert len(dataset) == 80 and len(dataset.coco.getImgIds()) == 80
    crowd = 0
    for i in range(len(dataset)):
        image, t = dataset[i]
        info = dataset.coco.imgs[int(t["image_id"])]
        anns = [a for a in raw["annotations"] if a["image_id"] == info["id"]]
        h, w = t["size"].tolist()
        assert image.shape == (3, h, w) and max(h, w) <= 333
        assert min(h, w) == 200 or max(h, w) >= 332  # the official rule rounds the capped side down
        assert t["orig_size"].tolist() == [info["height"], info["width"]]
        assert len(t["labels"]) == len(anns)  # no coco-mini box is degenerate
        crowd += int(t["iscrowd"].sum())
        w, h = info["width"], info["height"]
        expected = torch.tensor([[(a["bbox"][0] + a["bbox"][2] / 2) / w, (a["bbox"][1] + a["bbox"][3] / 2) / h,
                                  a["bbox"][2] / w, a["bbox"][3] / h] for a in anns]).reshape(-1, 4)
        torch.testing.assert_close(t["boxes"], expected.clamp(0, 1), atol=1e-5, rtol=0)
    assert crowd == 8


def test_eval_loader_splits_ranks_without_duplicates(coco_mini):
    cfg = eval_cfg(coco_mini)
    dataset = build_eval_dataset(cfg)
    seen = []
    for rank in range(3):
        loader = build_eval_loader(cfg, batch_size=8, rank=rank, world_size=3, dataset=dataset)
        ids = [int(t["image_id"]) for batch in loader for t in batch.targets]
        assert len(ids) in (26, 27)
        seen += ids
    assert sorted(seen) == sorted(dataset.coco.getImgIds())


def test_eval_dataset_reads_from_s3(coco_mini, s3_bucket):
    fs = s3_bucket.fs()
    names = sorted(p.name for p in (coco_mini / "train2017").iterdir())[:3]
    for name in names:
        fs.put_file(str(coco_mini / "train2017" / name), f"{s3_bucket.name}/val/{name}")
    raw = json.loads((coco_mini / "annotations" / "instances_train2017.json").read_text())
    keep = {img["id"] for img in raw["images"] if img["file_name"] in names}
    raw["images"] = [img for img in raw["images"] if img["id"] in keep]
    raw["annotations"] = [a for a in raw["annotations"] if a["image_id"] in keep]
    fs.pipe(f"{s3_bucket.name}/val.json", json.dumps(raw).encode())
    cfg = DataConfig(val_images=f"{s3_bucket.url}/val", val_annotations=f"{s3_bucket.url}/val.json",
                     storage_options=s3_bucket.storage_options, num_workers=0, eval_size=100, eval_max_size=200)
    batch = next(iter(build_eval_loader(cfg, batch_size=3, rank=0, world_size=1)))
    assert sorted(int(t["image_id"]) for t in batch.targets) == sorted(keep)
    assert batch.masks.shape == batch.images.shape[:1] + batch.images.shape[2:]


def test_eval_needs_paths():
    with pytest.raises(ValueError, match="val_images"):
        build_eval_dataset(DataConfig())


def coco_train_cfg(root, **overrides) -> DataConfig:
    base = dict(train_coco_images=str(root / "images"), train_coco_annotations=str(root / "annotations.json"),
                num_workers=0, train_scales=[48, 56], train_max_size=100, crop_scales=[40, 48], crop_min_size=24,
                crop_max_size=40, max_bad_fraction=0.5)
    return DataConfig(**{**base, **overrides})


def test_coco_folder_train_loader_splits_resumes_and_counts_bad(tmp_path):
    from data_synthetic import make_coco
    from dino_scale.data import CocoTrainLoader, build_train_loader

    data = make_coco(tmp_path, num_images=21, seed=3)
    (tmp_path / "images" / data["images"][4]["file_name"]).unlink()
    (tmp_path / "images" / data["images"][5]["file_name"]).write_bytes(b"garbage")
    seen = []
    for rank in range(2):
        loader = build_train_loader(coco_train_cfg(tmp_path), batch_size=4, rank=rank, world_size=2, seed=1)
        assert isinstance(loader, CocoTrainLoader)
        seen += [int(t["image_id"]) for b in loader for t in b.targets]
    assert sorted(seen) == sorted(img["id"] for img in data["images"][:4] + data["images"][6:])

    cfg = coco_train_cfg(tmp_path, num_workers=2, multiprocessing_context="fork")
    reference = list(build_train_loader(cfg, batch_size=3, rank=0, world_size=1, seed=4, epoch=1))
    first = build_train_loader(cfg, batch_size=3, rank=0, world_size=1, seed=4, epoch=1)
    head = [b for _, b in zip(range(2), first)]
    resumed = build_train_loader(cfg, batch_size=3, rank=0, world_size=1, seed=4)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    rest = list(resumed)
    assert len(head + rest) == len(reference)
    for x, y in zip(head + rest, reference):
        assert torch.equal(x.images, y.images)
        assert all(torch.equal(s["boxes"], t["boxes"]) for s, t in zip(x.targets, y.targets))
    assert resumed.stats()["reasons"] == {"missing_image": 1, "undecodable_image": 1}
    assert resumed.stats()["samples_read"] == 21
    clone = pickle.loads(pickle.dumps(resumed.dataset))  # what spawned workers receive
    assert torch.equal(clone[0][0], resumed.dataset[0][0])
