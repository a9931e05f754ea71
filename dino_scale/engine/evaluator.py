"""COCO evaluation: distributed inference, detections gathered to rank 0, pycocotools.

Every rank runs the model over its share of the eval loader and turns the post-processed
outputs into COCO result dicts (`image_id`, `category_id`, `bbox` [x, y, w, h] in the
original image's pixels, `score`); rank 0 gathers them, scores them with COCOeval and
broadcasts the numbers back, so every rank returns the same dict.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from dino_scale.engine import distributed as dist_utils
from dino_scale.io import atomic_write_text
from dino_scale.log import get_logger, progress

log = get_logger(__name__)

# The 12 numbers of COCOeval.summarize() for bbox, in its order.
STAT_NAMES = (
    "AP", "AP50", "AP75", "APs", "APm", "APl",
    "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)


def load_coco(annotation_file: str | Path) -> Any:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(annotation_file))


def detections_to_coco(image_ids: Iterable[int], results: Iterable[Mapping[str, torch.Tensor]]) -> list[dict]:
    """PostProcess outputs (absolute xyxy boxes) to COCO result dicts (xywh)."""
    out = []
    for image_id, res in zip(image_ids, results):
        boxes = res["boxes"].detach().float().cpu()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        for box, score, label in zip(xywh, res["scores"].tolist(), res["labels"].tolist()):
            out.append({"image_id": int(image_id), "category_id": int(label),
                        "bbox": [round(v, 3) for v in box], "score": round(float(score), 5)})
    return out


def coco_evaluate(coco_gt: Any, detections: list[dict], image_ids: Iterable[int] | None = None) -> dict[str, float]:
    """COCOeval bbox stats (0-1 scale, -1 where undefined) of `detections` against `coco_gt`."""
    if not detections:
        return {name: 0.0 for name in STAT_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(set(int(i) for i in image_ids))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats)}


def format_table(stats: Mapping[str, float]) -> str:
    names = [n for n in STAT_NAMES[:6] if n in stats]
    head = " | ".join(f"{n:>6}" for n in names)
    row = " | ".join(f"{100 * stats[n]:6.2f}" for n in names)
    return f"{head}\n{row}"


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Any], annotation_file: str | Path, *,
             postprocess: nn.Module, device: torch.device, dtype: torch.dtype = torch.float32,
             output_json: str | Path | None = None, detections_json: str | Path | None = None,
             ) -> dict[str, float]:
    """Evaluate `model` (any rank layout) and return the COCO stats on every rank."""
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    detections: list[dict] = []
    seen: set[int] = set()
    for batch in progress(loader, desc="eval", unit="batch"):
        batch = batch.to(device, dtype=dtype, non_blocking=True)
        images, masks, targets = batch.images, batch.masks, batch.targets
        outputs = model(images, masks)
        orig_sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        results = postprocess(
            {"pred_logits": outputs["pred_logits"].float(), "pred_boxes": outputs["pred_boxes"].float()},
            orig_sizes,
        )
        ids = [int(t["image_id"]) for t in targets]
        keep = [i for i, image_id in enumerate(ids) if image_id not in seen]
        seen.update(ids)
        detections.extend(detections_to_coco([ids[i] for i in keep], [results[i] for i in keep]))
    model.train(was_training)
    gathered = dist_utils.gather_objects_to_rank0((sorted(seen), detections))
    stats: dict[str, float] | None = None
    if dist_utils.rank() == 0:
        assert gathered is not None
        # an image scored by two ranks (a padded sampler) counts once: the first rank's
        image_ids: set[int] = set()
        all_dets: list[dict] = []
        for rank_ids, rank_dets in gathered:
            fresh = set(rank_ids) - image_ids
            image_ids.update(fresh)
            all_dets.extend(d for d in rank_dets if d["image_id"] in fresh)
        coco_gt = load_coco(annotation_file)
        stats = coco_evaluate(coco_gt, all_dets, image_ids)
        stats["num_images"] = float(len(image_ids))
        stats["seconds"] = time.perf_counter() - started
        log.info("COCO bbox evaluation on %d images:\n%s", len(image_ids), format_table(stats))
        if output_json is not None:
            atomic_write_text(output_json, json.dumps(stats, indent=2))
        if detections_json is not None:
            atomic_write_text(detections_json, json.dumps(all_dets))
    return dist_utils.broadcast_object(stats)

