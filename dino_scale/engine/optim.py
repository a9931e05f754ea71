"""Parameter groups and the learning-rate schedule of the official DINO recipe.

Groups: backbone parameters at `lr_backbone` (1e-5), the deformable-attention sampling
offsets and reference points at `lr * lr_linear_proj_mult`, everything else at `lr` (1e-4);
AdamW with weight decay 1e-4 on all of them. The official DINO recipe (param_dict_type
'default') has only the backbone/rest split, i.e. `lr_linear_proj_mult` 1.0; Deformable
DETR used 0.1. The schedule is a step decay
(`lr *= gamma` at each milestone, counted in epochs or optimizer steps) with an optional
linear warm-up over the first `warmup_steps` optimizer steps.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from dino_scale.config import OptimConfig

GROUP_NAMES = ("backbone", "linear_proj", "rest")


def _matches(name: str, keywords: Iterable[str]) -> bool:
    return any(k in name for k in keywords)


def build_param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Trainable parameters split into the three official groups (empty groups dropped).

    Each group carries `name` and `base_lr`; the schedule sets `lr = base_lr * factor`.
    """
    buckets: dict[str, list[nn.Parameter]] = {name: [] for name in GROUP_NAMES}
    for name, param in model.named_parameters():  # shared tensors are listed once
        if not param.requires_grad:
            continue
        if _matches(name, cfg.lr_backbone_names):
            buckets["backbone"].append(param)
        elif _matches(name, cfg.lr_linear_proj_names):
            buckets["linear_proj"].append(param)
        else:
            buckets["rest"].append(param)
    base_lr = {
        "backbone": cfg.lr_backbone,
        "linear_proj": cfg.lr * cfg.lr_linear_proj_mult,
        "rest": cfg.lr,
    }
    return [
        {"params": params, "lr": base_lr[name], "base_lr": base_lr[name], "name": name,
         "weight_decay": cfg.weight_decay}
        for name, params in buckets.items()
        if params
    ]


def build_optimizer(param_groups: list[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """A plain torch AdamW: DeepSpeed wraps it for ZeRO without JIT-building its own Adam."""
    return torch.optim.AdamW(
        param_groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay
    )


def lr_factor(cfg: OptimConfig, step: int, epoch: int) -> float:
    """Multiplier of the base learning rates for optimizer step `step` (0-based) in `epoch`."""
    position = epoch if cfg.lr_schedule_by == "epoch" else step
    factor = cfg.lr_drop_gamma ** sum(1 for m in cfg.lr_drop_milestones if position >= m)
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        factor *= (step + 1) / cfg.warmup_steps
    return factor


def apply_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group.get("base_lr", group["lr"]) * factor


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The largest group lr (the "rest" group: the headline learning rate)."""
    return max(group["lr"] for group in optimizer.param_groups)
