"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021, eq. 3), as a module
around the `dino_scale.ops` kernel."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dino_scale import ops

_KERNELS = {
    "auto": ops.ms_deform_attn,
    "native": ops.ms_deform_attn,
    "reference": ops.ms_deform_attn_reference,
    "gather": ops.ms_deform_attn_gather,
}


class MSDeformAttn(nn.Module):
    """Each query attends to `n_points` sampled locations per head and level around its
    reference point (or inside its reference box)."""

    def __init__(
        self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4, impl: str = "auto"
    ) -> None:
        super().__init__()
        # "reference" forces the grid_sample kernel, "gather" the indexing one (ONNX export);
        # "auto"/"native" use `ops.ms_deform_attn`
        if impl not in _KERNELS:
            raise ValueError(f"impl must be one of {sorted(_KERNELS)}, got {impl!r}")
        self.impl = impl
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # initial offsets: point k of head h at distance k+1 along direction 2*pi*h/n_heads
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        query:            [N, Lq, C]
        reference_points: [N, Lq, L, 2] normalised points, or [N, Lq, L, 4] boxes (cx, cy, w, h)
        value:            [N, S, C]     flattened multi-level features, S = sum(H_l * W_l)
        spatial_shapes:   [L, 2] (H_l, W_l); level_start_index: [L]
        padding_mask:     [N, S] bool, True = padding (its values are zeroed)
        returns           [N, Lq, C]
        """
        N, Lq, _ = query.shape
        S = value.shape[1]
        M, L, P = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(value)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(N, S, M, self.d_model // M)
        offsets = self.sampling_offsets(query).view(N, Lq, M, L, P, 2)
        weights = F.softmax(self.attention_weights(query).view(N, Lq, M, L * P), -1).view(N, Lq, M, L, P)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: normalise by (W_l, H_l)
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            # offsets are fractions of the half box size, divided by the number of points
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(f"reference_points must end in 2 or 4, got {tuple(reference_points.shape)}")
        kernel = _KERNELS[self.impl]
        if value.dtype in (torch.float16, torch.bfloat16):
            out = kernel(
                value.float(), spatial_shapes, level_start_index, locations.float(), weights.float()
            ).to(value.dtype)
        else:
            out = kernel(value, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(out)
