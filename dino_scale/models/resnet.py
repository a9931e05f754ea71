"""The ResNet backbone family: timm ResNets (`features_only`) with frozen BatchNorm, as the
official DINO freezes them, and the filter that fits timm/torchvision ImageNet weights to it."""

from __future__ import annotations

import timm
import torch
from torch import nn

from dino_scale.config import BackboneConfig

TIMM_MODULE = "resnet"  # timm's module of resnet*, resnext*, wide_resnet*, ...


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine terms, all buffers.

    Numerics of the official DINO: scale = weight * rsqrt(running_var + 1e-5),
    y = x * scale + (bias - running_mean * scale).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, **_: object) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # from an ordinary BatchNorm2d
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        bias = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        # statistics may stay fp32 while DeepSpeed casts the parameters and inputs to bf16/fp16
        return x * scale.to(x.dtype) + bias.to(x.dtype)


class ResNetBackbone(nn.Module):
    """timm ResNet, `features_only`; stage s is timm feature index s + 1 (index 0 is the stem)."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        kwargs = dict(cfg.timm_kwargs)
        if cfg.frozen_batchnorm:
            kwargs["norm_layer"] = FrozenBatchNorm2d
        self.body = timm.create_model(
            cfg.name, pretrained=False, features_only=True,
            out_indices=tuple(s + 1 for s in cfg.return_stages), **kwargs,
        )
        self.num_channels = list(self.body.feature_info.channels())
        if cfg.freeze_stem_and_first_stage:
            # the official rule: only layer2..layer4 train
            for name, p in self.body.named_parameters():
                if not name.startswith(("layer2.", "layer3.", "layer4.")):
                    p.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.body(images)


def checkpoint_filter_fn(state: dict[str, torch.Tensor], backbone: ResNetBackbone) -> dict[str, torch.Tensor]:
    """ImageNet weights (timm/torchvision layout) -> the keys of `backbone.body`:
    `features_only` drops the classifier and any stage after the last returned one."""
    present = {name for name, _ in backbone.body.named_children()}
    return {k: v for k, v in state.items() if k.split(".")[0] in present}
