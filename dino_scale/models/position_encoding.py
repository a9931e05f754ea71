"""Sine position encodings: the 2-D feature-map encoding and the query-box encoding."""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """Normalised 2-D sine encoding of a padded feature map (DETR, with the separate
    height/width temperatures of the official DINO `PositionEmbeddingSineHW`).

    Coordinates are the cumulative count of valid pixels along each axis, divided by the
    valid extent (+1e-6) and scaled to [0, 2*pi]; channel layout is [y features, x features],
    each alternating sin/cos.
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature_h: float = 20.0,
        temperature_w: float = 20.0,
        scale: float = 2 * math.pi,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature_h = temperature_h
        self.temperature_w = temperature_w
        self.scale = scale
        self.eps = eps

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """mask [B, H, W] bool (True = padding) -> [B, 2 * num_pos_feats, H, W] float32."""
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        y_embed = y_embed / (y_embed[:, -1:, :] + self.eps) * self.scale
        x_embed = x_embed / (x_embed[:, :, -1:] + self.eps) * self.scale
        pos_x = x_embed[..., None] / _frequencies(self.num_pos_feats, self.temperature_w, mask.device)
        pos_y = y_embed[..., None] / _frequencies(self.num_pos_feats, self.temperature_h, mask.device)
        pos = torch.cat((_interleave_sin_cos(pos_y), _interleave_sin_cos(pos_x)), dim=3)
        return pos.permute(0, 3, 1, 2)


def box_sine_embedding(boxes: torch.Tensor, num_feats: int = 128) -> torch.Tensor:
    """Sine encoding of normalised boxes (or points) for the decoder's query position.

    boxes [..., 4] (cx, cy, w, h) or [..., 2] (cx, cy), in [0, 1]
    returns [..., 4 * num_feats] as (y, x, w, h) blocks (or [..., 2 * num_feats] as (y, x));
    temperature 10000, scale 2*pi, as the official `gen_sineembed_for_position`.
    """
    dim_t = _frequencies(num_feats, 10000.0, boxes.device)
    coords = [boxes[..., 1], boxes[..., 0]] + ([boxes[..., 2], boxes[..., 3]] if boxes.shape[-1] == 4 else [])
    if boxes.shape[-1] not in (2, 4):
        raise ValueError(f"boxes must have 2 or 4 coordinates, got shape {tuple(boxes.shape)}")
    return torch.cat([_interleave_sin_cos(c[..., None] * (2 * math.pi) / dim_t) for c in coords], dim=-1)


def _frequencies(num_feats: int, temperature: float, device: torch.device) -> torch.Tensor:
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * (dim_t // 2) / num_feats)


def _interleave_sin_cos(x: torch.Tensor) -> torch.Tensor:
    """[..., F] -> [..., F]: sin of the even entries and cos of the odd ones, interleaved."""
    return torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2)
