"""Model outputs -> detections in image pixels, as DINO evaluates them.

Every (query, class) pair is a candidate scored by sigmoid(logit); the `num_select` best of each
image are kept, so one query can yield detections of several classes. No NMS.
"""

from __future__ import annotations

import torch
from torch import nn

from dino_scale.models.box_ops import box_cxcywh_to_xyxy


class PostProcess(nn.Module):
    """`postprocess(outputs, target_sizes)` -> per image `scores [K]`, `labels [K]` (int64
    class indices) and `boxes [K, 4]` (absolute xyxy), sorted by decreasing score, with
    K = min(num_select, Q * C)."""

    def __init__(self, num_select: int = 300) -> None:
        super().__init__()
        if num_select < 1:
            raise ValueError(f"num_select must be >= 1, got {num_select}")
        self.num_select = num_select

    @torch.no_grad()
    def forward(
        self, outputs: dict[str, torch.Tensor], target_sizes: torch.Tensor
    ) -> list[dict[str, torch.Tensor]]:
        """outputs: `pred_logits` [B, Q, C], `pred_boxes` [B, Q, 4] normalised cxcywh;
        target_sizes: [B, 2] (height, width) in pixels of the images the boxes refer to (the
        original images for COCO evaluation)."""
        logits = outputs["pred_logits"]
        if target_sizes.shape != (logits.shape[0], 2):
            raise ValueError(f"target_sizes must be [{logits.shape[0]}, 2] (h, w), got {tuple(target_sizes.shape)}")
        scores, labels, xyxy = top_detections(logits, outputs["pred_boxes"], target_sizes, self.num_select)
        return [
            {"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, xyxy)
        ]


def top_detections(logits: torch.Tensor, boxes: torch.Tensor, target_sizes: torch.Tensor, num_select: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batched core of `PostProcess` (also what the exported ONNX graph ends with).

    logits [B, Q, C], boxes [B, Q, 4] normalised cxcywh, target_sizes [B, 2] (h, w)
    -> scores [B, K] float32, labels [B, K] int64, boxes [B, K, 4] absolute xyxy float32,
    K = min(num_select, Q * C), sorted by decreasing score.
    """
    _, num_queries, num_classes = logits.shape
    k = min(num_select, num_queries * num_classes)
    scores, flat_index = logits.float().sigmoid().flatten(1).topk(k, dim=1)  # [B, K]
    query_index = torch.div(flat_index, num_classes, rounding_mode="floor")
    labels = flat_index % num_classes
    xyxy = box_cxcywh_to_xyxy(boxes.float())
    xyxy = xyxy.gather(1, query_index.unsqueeze(-1).expand(-1, -1, 4))  # [B, K, 4]
    height, width = target_sizes.to(xyxy).unbind(1)
    scale = torch.stack([width, height, width, height], dim=1)  # [B, 4]
    return scores, labels, xyxy * scale[:, None, :]
