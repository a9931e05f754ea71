"""Box conversions, areas, IoU and generalised IoU.

Formats: `cxcywh` is (centre x, centre y, width, height); `xyxy` is (left, top, right, bottom).
Pairwise functions take boxes `[N, 4]` and `[M, 4]` and return `[N, M]`; the `paired_`
functions take two `[N, 4]` tensors and return `[N]`, one value per row pair (what the loss
needs, without building the N x N matrix).

The epsilon in the IoU and GIoU denominators (1e-6) is the one the official DINO code uses, so
losses and matching costs equal its numbers.
"""

from __future__ import annotations

import torch

_EPS = 1e-6


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] (cx, cy, w, h) -> [..., 4] (x0, y0, x1, y1)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] (x0, y0, x1, y1) -> [..., 4] (cx, cy, w, h)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] xyxy -> [...] area (negative for inverted boxes; callers validate)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def check_xyxy(boxes: torch.Tensor, name: str = "boxes") -> None:
    """Raise ValueError if a box has x1 < x0 or y1 < y0 (GIoU is undefined there).

    NaN passes: non-finite predictions make a non-finite loss, which the trainer handles.
    """
    if boxes.shape[-1] != 4:
        raise ValueError(f"{name}: expected [..., 4] boxes, got shape {tuple(boxes.shape)}")
    if bool((boxes[..., 2:] < boxes[..., :2]).any()):
        raise ValueError(f"{name}: degenerate xyxy boxes (x1 < x0 or y1 < y0); GIoU is undefined for them")


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise IoU and union of xyxy boxes [N, 4] x [M, 4] -> ([N, M], [N, M])."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])  # [N, M, 2]
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / (union + _EPS), union


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise generalised IoU (Rezatofighi et al. 2019) of xyxy boxes [N, 4] x [M, 4] -> [N, M].

    GIoU = IoU - (|C| - |A u B|) / |C|, C the smallest box enclosing A and B; in [-1, 1].
    Raises ValueError on inverted boxes.
    """
    check_xyxy(boxes1, "boxes1")
    check_xyxy(boxes2, "boxes2")
    iou, union = box_iou(boxes1, boxes2)
    top_left = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / (enclosing + _EPS)


def paired_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and union of row pairs of xyxy boxes [N, 4], [N, 4] -> ([N], [N])."""
    if boxes1.shape != boxes2.shape:
        raise ValueError(f"paired boxes differ in shape: {tuple(boxes1.shape)} vs {tuple(boxes2.shape)}")
    top_left = torch.max(boxes1[:, :2], boxes2[:, :2])
    bottom_right = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = box_area(boxes1) + box_area(boxes2) - inter
    return inter / (union + _EPS), union


def paired_generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """GIoU of row pairs of xyxy boxes [N, 4], [N, 4] -> [N].

    Equals `generalized_box_iou(boxes1, boxes2).diagonal()` (the official loss's form) with
    O(N) memory instead of O(N^2). Raises ValueError on inverted boxes.
    """
    check_xyxy(boxes1, "boxes1")
    check_xyxy(boxes2, "boxes2")
    iou, union = paired_box_iou(boxes1, boxes2)
    top_left = torch.min(boxes1[:, :2], boxes2[:, :2])
    bottom_right = torch.max(boxes1[:, 2:], boxes2[:, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    enclosing = wh[:, 0] * wh[:, 1]
    return iou - (enclosing - union) / (enclosing + _EPS)
