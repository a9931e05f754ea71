"""A tiny detector-shaped model, criterion and resumable loader for trainer-mechanics tests
(resume exactness, NaN skipping): the real DINO runs in the launcher tests."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dino_scale.data import Batch


class TinyDetector(nn.Module):
    def __init__(self, num_classes: int = 5, queries: int = 4) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.dropout = nn.Dropout(0.3)
        self.sampling_offsets = nn.Linear(8, 8)
        self.class_embed = nn.Linear(8, queries * num_classes)
        self.bbox_embed = nn.Linear(8, queries * 4)
        self.num_classes, self.queries = num_classes, queries

    def forward(self, images, masks, targets=None):
        x = self.backbone(images).flatten(1)
        x = self.dropout(self.sampling_offsets(x).relu())
        b = x.shape[0]
        return {"pred_logits": self.class_embed(x).view(b, self.queries, self.num_classes),
                "pred_boxes": self.bbox_embed(x).sigmoid().view(b, self.queries, 4)}


class TinyCriterion:
    """Squared error to each image's first box plus CE to its first label; can be told
    to return NaN at given calls (counted over the criterion's lifetime), or a finite loss
    whose gradients are NaN."""

    def __init__(self, nan_calls: set[int] | None = None, nan_grad_calls: set[int] | None = None) -> None:
        self.calls = 0
        self.nan_calls = nan_calls or set()
        self.nan_grad_calls = nan_grad_calls or set()

    def __call__(self, outputs, targets, num_boxes=None):
        boxes = torch.stack([t["boxes"][0] for t in targets])
        labels = torch.stack([t["labels"][0] for t in targets])
        loss_bbox = ((outputs["pred_boxes"][:, 0] - boxes) ** 2).sum(-1).mean()
        loss_ce = nn.functional.cross_entropy(outputs["pred_logits"][:, 0], labels)
        loss = loss_ce + 5 * loss_bbox
        if self.calls in self.nan_calls:
            loss = loss * float("nan")
        if self.calls in self.nan_grad_calls:
            # value 0, gradient 0 * d sqrt(x)/dx at x = 0 = 0 * inf = NaN
            loss = loss + (0 * outputs["pred_boxes"].sum()).sqrt()
        self.calls += 1
        return {"loss": loss, "loss_ce": loss_ce.detach(), "loss_bbox": loss_bbox.detach()}


class TinyLoader:
    """Deterministic per (seed, rank, epoch) stream with a resumable position; draws its
    augmentation noise from the global torch RNG so that RNG restore matters (unless
    `global_noise` is False: a loader of another rank's share then gives that rank's batches)."""

    def __init__(self, num_batches: int, batch_size: int, rank: int, seed: int, epoch: int = 0,
                 size: int = 16, global_noise: bool = True) -> None:
        self.num_batches, self.batch_size, self.rank, self.seed = num_batches, batch_size, rank, seed
        self.epoch, self.position, self.size, self.global_noise = epoch, 0, size, global_noise

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]

    def stats(self) -> dict[str, Any]:
        return {"samples_read": self.position * self.batch_size, "samples_skipped": 0, "reasons": {},
                "bad_fraction": 0.0, "epoch": self.epoch, "batches": self.position}

    def __iter__(self):
        while self.position < self.num_batches:
            g = torch.Generator().manual_seed(self.seed * 7919 + self.rank * 131 + self.epoch * 17 + self.position)
            n = self.size
            images = torch.rand(self.batch_size, 3, n, n, generator=g)
            noise = torch.randn(images.shape, generator=None if self.global_noise else g)  # global RNG
            images = images + 0.01 * noise
            targets = [{"boxes": torch.rand(2, 4, generator=g) * 0.5 + 0.25,
                        "labels": torch.randint(0, 5, (2,), generator=g),
                        "image_id": torch.tensor(i), "orig_size": torch.tensor([n, n]),
                        "size": torch.tensor([n, n])} for i in range(self.batch_size)]
            self.position += 1
            yield Batch(images, torch.zeros(self.batch_size, n, n, dtype=torch.bool), targets)
