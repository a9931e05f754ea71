"""Hungarian matching between predictions and ground truth, as DINO (and Deformable DETR) do it.

The cost of assigning query q to target t is

    set_cost_class * (focal_pos(p_qc) - focal_neg(p_qc)) + set_cost_bbox * |b_q - b_t|_1
        - set_cost_giou * GIoU(b_q, b_t),      c = label of t, p = sigmoid(logit),

with focal_pos(p) = alpha (1 - p)^gamma (-log(p + 1e-8)) and
focal_neg(p) = (1 - alpha) p^gamma (-log(1 - p + 1e-8)): the change in focal loss when the
query's class-c output turns from a negative into a positive. L1 and GIoU are on normalised
cxcywh boxes (GIoU after conversion to xyxy). The assignment minimising the total cost per
image comes from scipy's `linear_sum_assignment`.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from dino_scale.config import ModelConfig
from dino_scale.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

# One (query indices, target indices) pair per image, both int64 [min(Q, n)], query indices
# increasing.
MatchIndices = list[tuple[torch.Tensor, torch.Tensor]]

_NON_FINITE_COST = 1e8


def focal_class_cost(
    prob: torch.Tensor, labels: torch.Tensor, alpha: float, gamma: float
) -> torch.Tensor:
    """prob [N, C] (sigmoid scores), labels [M] int64 -> [N, M] focal-style class cost."""
    neg = (1 - alpha) * prob.pow(gamma) * -(1 - prob + 1e-8).log()
    pos = alpha * (1 - prob).pow(gamma) * -(prob + 1e-8).log()
    return pos[:, labels] - neg[:, labels]


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising the DINO matching cost."""

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("matcher costs are all zero: every assignment would be equal")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def cost_matrix(
        self, pred_logits: torch.Tensor, pred_boxes: torch.Tensor, targets: list[dict[str, torch.Tensor]]
    ) -> torch.Tensor:
        """pred_logits [B, Q, C], pred_boxes [B, Q, 4] -> cost [B, Q, N_total] (all targets of
        the batch concatenated; each image uses only its own column block)."""
        batch, num_queries = pred_logits.shape[:2]
        # float32 whatever the model's precision: bf16 costs would reorder near-ties
        prob = pred_logits.flatten(0, 1).float().sigmoid()  # [B*Q, C]
        boxes = pred_boxes.flatten(0, 1).float()  # [B*Q, 4]
        tgt_labels = torch.cat([t["labels"] for t in targets]).to(prob.device)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(boxes)
        num_classes = prob.shape[-1]
        if tgt_labels.numel() and (tgt_labels.min() < 0 or tgt_labels.max() >= num_classes):
            raise ValueError(
                f"target labels must lie in [0, {num_classes}); got "
                f"[{int(tgt_labels.min())}, {int(tgt_labels.max())}]"
            )
        cost = (
            self.cost_bbox * torch.cdist(boxes, tgt_boxes, p=1)
            + self.cost_class * focal_class_cost(prob, tgt_labels, self.focal_alpha, self.focal_gamma)
            - self.cost_giou
            * generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
        )
        return cost.view(batch, num_queries, -1)

    @torch.no_grad()
    def forward(
        self, outputs: dict[str, torch.Tensor], targets: list[dict[str, torch.Tensor]]
    ) -> MatchIndices:
        """outputs: `pred_logits` [B, Q, C], `pred_boxes` [B, Q, 4] (normalised cxcywh);
        targets: B dicts with `labels` int64 [n_b] and `boxes` [n_b, 4] normalised cxcywh.
        Returns per image (query indices, target indices), each int64 of length min(Q, n_b)."""
        pred_logits, pred_boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if len(targets) != pred_logits.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {pred_logits.shape[0]}")
        sizes = [len(t["boxes"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in targets]
        cost = self.cost_matrix(pred_logits, pred_boxes, targets).cpu()
        # NaN / inf predictions (a diverging step): match anyway; the loss comes out non-finite
        # and the trainer skips the step on every rank, where raising here would leave the
        # other ranks waiting in a collective
        cost = torch.nan_to_num(cost, nan=_NON_FINITE_COST, posinf=_NON_FINITE_COST, neginf=-_NON_FINITE_COST)
        indices: MatchIndices = []
        for image, block in enumerate(cost.split(sizes, dim=-1)):
            if sizes[image] == 0:
                indices.append((empty, empty))
                continue
            rows, cols = linear_sum_assignment(block[image].numpy())
            indices.append(
                (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
            )
        return indices


def build_matcher(cfg: ModelConfig) -> HungarianMatcher:
    return HungarianMatcher(
        cost_class=cfg.set_cost_class,
        cost_bbox=cfg.set_cost_bbox,
        cost_giou=cfg.set_cost_giou,
        focal_alpha=cfg.focal_alpha,
        focal_gamma=cfg.focal_gamma,
    )
