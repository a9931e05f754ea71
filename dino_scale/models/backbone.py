"""Backbones through timm (no downloads): ResNet with frozen BatchNorm, and Swin run with
the official detection Swin's padding rules.

A backbone maps images [B, 3, H, W] to the feature maps of `return_stages` (0-based stage
indices: ResNet layer1..4, Swin stages 0..3), and exposes `num_channels` for them.
"""

from __future__ import annotations

import math
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from dino_scale.config import BackboneConfig


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


class SwinBackbone(nn.Module):
    """timm Swin Transformer modules, run as the official detection Swin runs them:
    the image is padded to a multiple of the patch size, each block pads its input to a
    multiple of the window before the cyclic shift (timm shifts first, then pads), windows
    never shrink to the feature size, and every returned stage gets its own LayerNorm.

    timm puts PatchMerging at the start of stage i+1 where the official Swin has it at the
    end of stage i; outputs are taken after the blocks, before the next downsample, so the
    features are the official ones.
    """

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        kwargs = dict(cfg.timm_kwargs)
        self.body = timm.create_model(
            cfg.name, pretrained=False, num_classes=0, global_pool="", drop_path_rate=cfg.drop_path_rate,
            strict_img_size=False, always_partition=True, **kwargs,
        )
        # the classifier's final norm and head are not part of the detector
        self.body.norm = nn.Identity()
        self.body.head = nn.Identity()
        self.return_stages = list(cfg.return_stages)
        self.grad_checkpointing = cfg.grad_checkpointing
        info = self.body.feature_info
        self.num_channels = [info[s]["num_chs"] for s in self.return_stages]
        self.patch_size = self.body.patch_embed.patch_size
        self.norms = nn.ModuleDict({str(s): nn.LayerNorm(info[s]["num_chs"]) for s in self.return_stages})

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        _, _, H, W = images.shape
        ph, pw = self.patch_size
        x = F.pad(images, (0, (pw - W % pw) % pw, 0, (ph - H % ph) % ph))
        x = self.body.patch_embed(x)  # [B, H/4, W/4, C]
        outs = []
        for i, stage in enumerate(self.body.layers):
            x = stage.downsample(x)
            window = stage.blocks[0].window_size[0]
            shift = window // 2
            mask = _shifted_window_mask(x.shape[1], x.shape[2], window, shift, x.device, x.dtype)
            for j, block in enumerate(stage.blocks):
                block_mask = mask if j % 2 == 1 else None
                block_shift = shift if j % 2 == 1 else 0
                if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                    x = torch.utils.checkpoint.checkpoint(
                        _swin_block, block, x, window, block_shift, block_mask, use_reentrant=False
                    )
                else:
                    x = _swin_block(block, x, window, block_shift, block_mask)
            if i in self.return_stages:
                outs.append(self.norms[str(i)](x).permute(0, 3, 1, 2).contiguous())
        return outs


def _swin_block(block: nn.Module, x: torch.Tensor, window: int, shift: int, mask: torch.Tensor | None
                ) -> torch.Tensor:
    """One Swin block (timm module, official order): x [B, H, W, C] -> [B, H, W, C]."""
    B, H, W, C = x.shape
    shortcut = x
    x = block.norm1(x)
    x = F.pad(x, (0, 0, 0, (window - W % window) % window, 0, (window - H % window) % window))
    Hp, Wp = x.shape[1], x.shape[2]
    if shift:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
    windows = _window_partition(x, window).view(-1, window * window, C)
    windows = block.attn(windows, mask=mask)
    x = _window_reverse(windows.view(-1, window, window, C), window, Hp, Wp)
    if shift:
        x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
    x = shortcut + block.drop_path1(x[:, :H, :W, :])
    return x + block.drop_path2(block.mlp(block.norm2(x)))


def _shifted_window_mask(H: int, W: int, window: int, shift: int, device, dtype) -> torch.Tensor:
    """[num_windows, window**2, window**2]: -100 between tokens that the cyclic shift brought
    together from different regions of the padded map, 0 elsewhere."""
    Hp, Wp = math.ceil(H / window) * window, math.ceil(W / window) * window
    img = torch.zeros((1, Hp, Wp, 1), device=device, dtype=dtype)
    cnt = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            img[:, hs, ws, :] = cnt
            cnt += 1
    windows = _window_partition(img, window).view(-1, window * window)
    diff = windows.unsqueeze(1) - windows.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


def _window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, C)


def _window_reverse(windows: torch.Tensor, window: int, H: int, W: int) -> torch.Tensor:
    C = windows.shape[-1]
    x = windows.view(-1, H // window, W // window, window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    backbone: nn.Module
    if cfg.name.startswith("swin"):
        backbone = SwinBackbone(cfg)
    else:
        backbone = ResNetBackbone(cfg)
    if cfg.pretrained_path:
        load_backbone_weights(backbone, cfg.pretrained_path)
    return backbone


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load ImageNet weights from a local file (timm/torchvision layout; for Swin also the
    official Microsoft layout, whose PatchMerging belongs to the previous stage).
    Classifier heads are ignored; any missing backbone parameter is an error."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    body = backbone.body
    if isinstance(backbone, SwinBackbone):
        from dino_scale.checkpoint_convert import swin_official_to_timm_key

        if any(".downsample." in k and k.startswith("layers.0.") for k in state):
            state = {swin_official_to_timm_key(k): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith(("head.", "norm."))
                 and not k.endswith(("relative_position_index", "attn_mask"))}
    else:
        # features_only drops the classifier and any stage after the last returned one
        present = {name for name, _ in body.named_children()}
        state = {k: v for k, v in state.items() if k.split(".")[0] in present}
    missing, unexpected = body.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(("relative_position_index", "attn_mask"))]
    if missing or unexpected:
        raise ValueError(
            f"backbone weights {path} do not fit {type(backbone).__name__}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
