"""The Swin backbone family: timm Swin Transformer modules run with the official detection
Swin's padding rules, and the official (Microsoft) Swin key layout, whose PatchMerging
belongs to the end of a stage where timm puts it at the start of the next one."""

from __future__ import annotations

import math
import re

import timm
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from dino_scale.config import BackboneConfig

TIMM_MODULE = "swin_transformer"
# buffers that the model computes and official files store: checked or dropped, never loaded
DERIVED_SUFFIXES = ("relative_position_index", "attn_mask")
_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.(.+)$")


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


def official_to_timm_key(key: str) -> str:
    """Official (Microsoft) Swin key -> timm key: PatchMerging moves to the next stage."""
    m = _DOWNSAMPLE.match(key)
    if m:
        return f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
    return key


def timm_to_official_key(key: str) -> str:
    m = _DOWNSAMPLE.match(key)
    if m:
        return f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
    return key


def relative_position_index(window: int) -> torch.Tensor:
    """[window**2, window**2] index into the (2*window-1)**2 relative-position bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[:, :, 0] * (2 * window - 1) + rel[:, :, 1]


def checkpoint_filter_fn(state: dict[str, torch.Tensor], backbone: SwinBackbone) -> dict[str, torch.Tensor]:
    """ImageNet weights in timm's or the official layout -> the keys of `backbone.body`
    (classifier head, final norm and derived buffers dropped)."""
    if any(".downsample." in k and k.startswith("layers.0.") for k in state):
        state = {official_to_timm_key(k): v for k, v in state.items()}
    return {k: v for k, v in state.items()
            if not k.startswith(("head.", "norm.")) and not k.endswith(DERIVED_SUFFIXES)}
