"""Backbones through timm (no downloads), chosen from a registry of families.

A backbone maps images [B, 3, H, W] to the feature maps of `return_stages` (0-based stage
indices: ResNet layer1..4, Swin stages 0..3), and exposes `num_channels` for them. A family
is the timm module its models come from, our wrapper class, and the filter that fits
ImageNet weight files to it (its key remapping, as timm's `checkpoint_filter_fn`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from dino_scale.config import BackboneConfig
from dino_scale.models import resnet, swin
from dino_scale.models.resnet import FrozenBatchNorm2d, ResNetBackbone
from dino_scale.models.state_dict import describe_mismatch
from dino_scale.models.swin import SwinBackbone


@dataclass(frozen=True)
class BackboneFamily:
    timm_module: str
    model: type[nn.Module]
    checkpoint_filter_fn: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]
    derived_suffixes: tuple[str, ...] = ()


BACKBONE_FAMILIES: dict[str, BackboneFamily] = {
    "resnet": BackboneFamily(resnet.TIMM_MODULE, ResNetBackbone, resnet.checkpoint_filter_fn),
    "swin": BackboneFamily(swin.TIMM_MODULE, SwinBackbone, swin.checkpoint_filter_fn, swin.DERIVED_SUFFIXES),
}


def backbone_family(name: str) -> BackboneFamily:
    """The family of timm model `name`; a clear error for names no family covers."""
    for family in BACKBONE_FAMILIES.values():
        if timm.models.is_model_in_modules(name, [family.timm_module]):
            return family
    supported = ", ".join(f"{key} (timm module {f.timm_module})" for key, f in BACKBONE_FAMILIES.items())
    what = "is not a timm model" if not timm.is_model(name) else "belongs to no supported backbone family"
    raise ValueError(f"model.backbone.name={name!r} {what}; supported families: {supported}")


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    backbone = backbone_family(cfg.name).model(cfg)
    if cfg.pretrained_path:
        load_backbone_weights(backbone, cfg.pretrained_path)
    return backbone


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load ImageNet weights from a local file (timm/torchvision layout; for Swin also the
    official Microsoft layout). Classifier heads are ignored; any missing backbone
    parameter is an error."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    family = next(f for f in BACKBONE_FAMILIES.values() if isinstance(backbone, f.model))
    missing, unexpected = backbone.body.load_state_dict(family.checkpoint_filter_fn(state, backbone), strict=False)
    missing = [k for k in missing if not k.endswith(family.derived_suffixes)]
    if missing or unexpected:
        raise ValueError(f"backbone weights {path} do not fit {type(backbone).__name__}: "
                         + describe_mismatch(missing, unexpected, shown=5))


__all__ = ["BACKBONE_FAMILIES", "BackboneFamily", "FrozenBatchNorm2d", "ResNetBackbone", "SwinBackbone",
           "backbone_family", "build_backbone", "load_backbone_weights"]
