"""COCO evaluation: our conversion + scoring equals pycocotools run by hand on coco-mini."""

from __future__ import annotations

import contextlib
import io
import json
import random

import pytest
import torch

from dino_scale.engine.evaluator import STAT_NAMES, coco_evaluate, detections_to_coco, load_coco


def _hand_scored(ann_file, detections):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        dt = gt.loadRes(detections)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return list(ev.stats)


def _postprocess_like(gt, image_id, rng, jitter):
    """PostProcess-shaped output (absolute xyxy) from the GT boxes, jittered, with false
    positives and shuffled scores."""
    anns = gt.loadAnns(gt.getAnnIds(imgIds=[image_id], iscrowd=False))
    boxes, labels, scores = [], [], []
    for ann in anns:
        x, y, w, h = ann["bbox"]
        dx, dy = rng.uniform(-jitter, jitter) * w, rng.uniform(-jitter, jitter) * h
        boxes.append([x + dx, y + dy, x + w + dx, y + h + dy])
        labels.append(ann["category_id"] if rng.random() > 0.1 else rng.choice(gt.getCatIds()))
        scores.append(rng.random())
    for _ in range(3):
        boxes.append([10.0, 10.0, 60.0, 90.0])
        labels.append(rng.choice(gt.getCatIds()))
        scores.append(rng.random() * 0.5)
    return {"boxes": torch.tensor(boxes).reshape(-1, 4), "labels": torch.tensor(labels),
            "scores": torch.tensor(scores)}


def test_perfect_detections_score_ap_one(coco_mini):
    ann = coco_mini / "annotations" / "instances_train2017.json"
    gt = load_coco(ann)
    ids = gt.getImgIds()
    exact = []
    for image_id in ids:
        anns = gt.loadAnns(gt.getAnnIds(imgIds=[image_id], iscrowd=False))
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        exact.append({"boxes": torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4),
                      "labels": torch.tensor([a["category_id"] for a in anns]),
                      "scores": torch.ones(len(anns))})
    stats = coco_evaluate(gt, detections_to_coco(ids, exact))
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)


def test_scores_equal_pycocotools_by_hand(coco_mini, tmp_path):
    ann = coco_mini / "annotations" / "instances_train2017.json"
    gt = load_coco(ann)
    ids = gt.getImgIds()
    rng = random.Random(1)
    results = [_postprocess_like(gt, i, rng, jitter=0.15) for i in ids]
    detections = detections_to_coco(ids, results)
    ours = coco_evaluate(gt, detections)
    hand = _hand_scored(ann, json.loads(json.dumps(detections)))
    assert [ours[n] for n in STAT_NAMES] == pytest.approx(hand, abs=1e-12)
    assert 0.2 < ours["AP50"] < 1.0  # jittered boxes: neither trivial nor perfect
