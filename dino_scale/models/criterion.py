"""DINO's training loss: focal classification, L1 and GIoU box losses on every decoder layer,
on the denoising queries and on the encoder proposals.

Per output (one decoder layer, the encoder proposals, or one layer's denoising queries):

    loss_ce   = sum over queries q, classes c of focal(logit_qc, onehot_qc) / num_boxes
    loss_bbox = sum over matched (q, t) of |b_q - b_t|_1 / num_boxes     (normalised cxcywh)
    loss_giou = sum over matched (q, t) of (1 - GIoU(b_q, b_t)) / num_boxes

onehot_qc is 1 where query q is matched to a target of class c; unmatched queries are negatives
for every class. Matching queries and encoder proposals are matched by the Hungarian matcher;
the positive denoising query of group g for target j sits at g * single_pad + j and is paired
with target j (negative denoising queries only ever see an all-zero one-hot); denoising terms
divide by num_boxes * num_groups. num_boxes is the batch's target count, averaged over ranks,
at least 1.

The official code writes loss_ce as `focal.mean(1).sum() / num_boxes * num_queries`; the mean
over queries times the query count is the sum written above (it also stays 0, not NaN, when an
output has no queries).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from dino_scale.config import ModelConfig
from dino_scale.models.box_ops import box_cxcywh_to_xyxy, paired_generalized_box_iou
from dino_scale.models.matcher import HungarianMatcher, MatchIndices, build_matcher

Targets = list[dict[str, torch.Tensor]]

TERMS = ("loss_ce", "loss_bbox", "loss_giou")


def build_weight_dict(
    cls_coef: float, bbox_coef: float, giou_coef: float, dec_layers: int, denoising: bool
) -> dict[str, float]:
    """Weight of every loss term, named as `SetCriterion.forward` names them."""
    base = {"loss_ce": cls_coef, "loss_bbox": bbox_coef, "loss_giou": giou_coef}
    per_layer = dict(base)
    if denoising:
        per_layer.update({f"{k}_dn": v for k, v in base.items()})
    weights = dict(per_layer)
    for layer in range(dec_layers - 1):
        weights.update({f"{k}_{layer}": v for k, v in per_layer.items()})
    weights.update({f"{k}_enc": v for k, v in base.items()})
    return weights


def global_num_boxes(targets: Targets, device: torch.device) -> float:
    """Target boxes in the batch, averaged over ranks when torch.distributed is initialised,
    at least 1: the normaliser of every loss term."""
    count = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
        count = count / dist.get_world_size()
    return float(count.clamp(min=1).item())


def denoising_indices(targets: Targets, single_pad: int, num_groups: int) -> MatchIndices:
    """(query, target) pairs of the positive denoising queries: group g's query for target j of
    an image is g * single_pad + j; groups in order, targets in order within a group."""
    indices: MatchIndices = []
    for image, target in enumerate(targets):
        num = len(target["labels"])
        if 2 * num > single_pad:
            raise ValueError(
                f"image {image} has {num} targets but a denoising group holds "
                f"{single_pad // 2} positives (single_pad {single_pad})"
            )
        tgt = torch.arange(num, dtype=torch.int64).repeat(num_groups)
        group = torch.arange(num_groups, dtype=torch.int64).repeat_interleave(num)
        indices.append((group * single_pad + tgt, tgt))
    return indices


class SetCriterion(nn.Module):
    """Loss of a DINO model's outputs against a batch of targets.

    `forward(outputs, targets)` returns `"loss"`, the weighted sum to back-propagate, and every
    unweighted term detached for logging: `loss_ce`, `loss_bbox`, `loss_giou` (final layer),
    with suffixes `_0` .. `_{L-2}` (earlier decoder layers), `_dn` / `_dn_{i}` (denoising queries
    of the final / earlier layers), `_enc` (encoder proposals); and `class_error`, the top-1
    error (%) of the final layer's matched queries, which no loss uses.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        denoising: bool = True,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.denoising = denoising

    # -- the three terms of one output ---------------------------------------------------

    def loss_labels(
        self, logits: torch.Tensor, targets: Targets, indices: MatchIndices, num_boxes: float
    ) -> torch.Tensor:
        """logits [B, Q, C] -> focal loss, negatives everywhere but the matched (query, label)."""
        logits = logits.float()
        onehot = torch.zeros_like(logits)
        batch_idx, query_idx = _source_index(indices, logits.device)
        labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        onehot[batch_idx, query_idx, labels] = 1.0
        loss = sigmoid_focal_loss(
            logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum"
        )
        return loss / num_boxes

    def loss_boxes(
        self, boxes: torch.Tensor, targets: Targets, indices: MatchIndices, num_boxes: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """boxes [B, Q, 4] normalised cxcywh -> (L1 loss, GIoU loss) over the matched pairs."""
        batch_idx, query_idx = _source_index(indices, boxes.device)
        src = boxes.float()[batch_idx, query_idx]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src)
        loss_bbox = F.l1_loss(src, tgt, reduction="sum") / num_boxes
        giou = paired_generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt))
        loss_giou = (1 - giou).sum() / num_boxes
        return loss_bbox, loss_giou

    def output_losses(
        self,
        output: dict[str, torch.Tensor],
        targets: Targets,
        indices: MatchIndices,
        num_boxes: float,
        suffix: str,
    ) -> dict[str, torch.Tensor]:
        loss_ce = self.loss_labels(output["pred_logits"], targets, indices, num_boxes)
        loss_bbox, loss_giou = self.loss_boxes(output["pred_boxes"], targets, indices, num_boxes)
        return {f"loss_ce{suffix}": loss_ce, f"loss_bbox{suffix}": loss_bbox, f"loss_giou{suffix}": loss_giou}

    # -- the whole set ----------------------------------------------------------------------

    def forward(self, outputs: dict, targets: Targets, num_boxes: float | None = None) -> dict[str, torch.Tensor]:
        """num_boxes: the normaliser; default `global_num_boxes(targets)` (the official one). The
        trainer passes the mean over a global step's micro-batches when it accumulates."""
        pred_logits = outputs["pred_logits"]
        if len(targets) != pred_logits.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {pred_logits.shape[0]}")
        self._check_targets(targets)
        device = pred_logits.device
        if num_boxes is None:
            num_boxes = global_num_boxes(targets, device)

        losses: dict[str, torch.Tensor] = {}
        indices = self.matcher(outputs, targets)
        losses.update(self.output_losses(outputs, targets, indices, num_boxes, ""))
        losses["class_error"] = _class_error(pred_logits, targets, indices)

        aux_outputs = outputs.get("aux_outputs", [])
        for layer, aux in enumerate(aux_outputs):
            aux_indices = self.matcher(aux, targets)
            losses.update(self.output_losses(aux, targets, aux_indices, num_boxes, f"_{layer}"))

        dn_outputs = outputs.get("dn_outputs")
        if dn_outputs:
            if len(dn_outputs) != len(aux_outputs) + 1:
                raise ValueError(
                    f"{len(dn_outputs)} denoising outputs for {len(aux_outputs) + 1} decoder layers"
                )
            meta = outputs["dn_meta"]
            pad_size, num_groups, single_pad = meta["pad_size"], meta["num_groups"], meta["single_pad"]
            if num_groups < 1 or pad_size != num_groups * single_pad:
                raise ValueError(f"inconsistent dn_meta {meta}: pad_size != num_groups * single_pad")
            dn_indices = denoising_indices(targets, single_pad, num_groups)
            dn_num_boxes = num_boxes * num_groups
            for layer, dn in enumerate(dn_outputs):
                suffix = "_dn" if layer == len(dn_outputs) - 1 else f"_dn_{layer}"
                losses.update(self.output_losses(dn, targets, dn_indices, dn_num_boxes, suffix))
        elif self.denoising and aux_outputs:
            # A training-mode output without denoising queries (a batch with no boxes): zeros
            # keep the set of logged terms the same on every rank and every step.
            zero = pred_logits.new_zeros((), dtype=torch.float32)
            suffixes = ["_dn"] + [f"_dn_{layer}" for layer in range(len(aux_outputs))]
            losses.update({f"{term}{s}": zero for term in TERMS for s in suffixes})

        if "enc_outputs" in outputs:
            enc = outputs["enc_outputs"]
            enc_indices = self.matcher(enc, targets)
            losses.update(self.output_losses(enc, targets, enc_indices, num_boxes, "_enc"))

        unknown = [k for k in losses if k.startswith("loss_") and k not in self.weight_dict]
        if unknown:
            raise ValueError(
                f"loss terms {unknown} have no weight: the model has more decoder layers than "
                f"the criterion was built for"
            )
        total = sum(self.weight_dict[k] * v for k, v in losses.items() if k in self.weight_dict)
        logged = {k: v.detach() for k, v in losses.items()}
        return {"loss": total, **logged}

    def _check_targets(self, targets: Targets) -> None:
        for image, target in enumerate(targets):
            labels, boxes = target["labels"], target["boxes"]
            if labels.dtype != torch.int64 or labels.dim() != 1:
                raise ValueError(
                    f"target {image}: labels must be int64 [n], got {labels.dtype} {tuple(labels.shape)}"
                )
            if boxes.shape != (labels.shape[0], 4):
                raise ValueError(
                    f"target {image}: boxes must be [n, 4] with n = {labels.shape[0]} labels, "
                    f"got {tuple(boxes.shape)}"
                )
        labels = torch.cat([t["labels"] for t in targets])
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"target labels must lie in [0, {self.num_classes}), got "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )


def _source_index(indices: MatchIndices, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Matched (image, query) index pair for advanced indexing of [B, Q, ...] outputs."""
    batch_idx = torch.cat([torch.full_like(src, image) for image, (src, _) in enumerate(indices)])
    query_idx = torch.cat([src for src, _ in indices])
    return batch_idx.to(device), query_idx.to(device)


@torch.no_grad()
def _class_error(logits: torch.Tensor, targets: Targets, indices: MatchIndices) -> torch.Tensor:
    """100 - top-1 accuracy (%) of the matched queries' argmax class; 100 with no matches, as
    the official logs it."""
    batch_idx, query_idx = _source_index(indices, logits.device)
    labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
    if labels.numel() == 0:
        return logits.new_full((), 100.0, dtype=torch.float32)
    correct = (logits[batch_idx, query_idx].argmax(-1) == labels).float().mean()
    return 100.0 - 100.0 * correct


def build_criterion(cfg: ModelConfig) -> SetCriterion:
    """The criterion with the matcher and loss weights of `cfg`."""
    return SetCriterion(
        num_classes=cfg.num_classes,
        matcher=build_matcher(cfg),
        weight_dict=build_weight_dict(
            cfg.cls_loss_coef, cfg.bbox_loss_coef, cfg.giou_loss_coef, cfg.dec_layers, cfg.dn_number > 0
        ),
        focal_alpha=cfg.focal_alpha,
        focal_gamma=cfg.focal_gamma,
        denoising=cfg.dn_number > 0,
    )
