"""Multi-scale deformable attention from indexing and arithmetic only: the formulation that
exports to standard ONNX ops (Gather, Floor, Where, MatMul, ...) with every shape dynamic.

The levels are never split in Python: each sample's four bilinear corners are turned into
row indices of the flattened value (`level_start_index[l] + y * W_l + x`) and fetched with
one gather per corner, so `spatial_shapes` and `level_start_index` stay tensors in the graph.
"""

from __future__ import annotations

import torch


def ms_deform_attn_gather(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """The semantics of `ms_deform_attn_reference` (bilinear, align_corners=False, zeros
    outside the map, non-finite locations sample nothing).

    value:              [N, S, M, D]
    spatial_shapes:     [L, 2] int64 (H_l, W_l)
    level_start_index:  [L] int64
    sampling_locations: [N, Lq, M, L, P, 2] (x, y) in [0, 1]
    attention_weights:  [N, Lq, M, L, P]
    returns:            [N, Lq, M * D]

    Memory: one corner's samples at a time, [N, M, Lq, L * P, D] in value's dtype.
    """
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    dtype = value.dtype
    height = spatial_shapes[:, 0].view(1, 1, 1, L, 1)
    width = spatial_shapes[:, 1].view(1, 1, 1, L, 1)
    start = level_start_index.view(1, 1, 1, L, 1)
    size_xy = spatial_shapes.flip(-1).to(dtype).view(1, 1, 1, L, 1, 2)

    finite = sampling_locations.isfinite().all(-1, keepdim=True)
    locations = sampling_locations.to(dtype)
    locations = torch.where(finite, locations, torch.full_like(locations, -1.0))
    # pixel coordinates; clamped just outside the map so that far-away samples (all four
    # corners outside, weight 0 either way) cannot overflow the integer cast
    pixel = locations * size_xy - 0.5
    pixel = torch.minimum(pixel.clamp(min=-2.0), size_xy + 1.0)
    low = pixel.floor()
    frac = pixel - low
    x0, y0 = low[..., 0].long(), low[..., 1].long()
    fx, fy = frac[..., 0], frac[..., 1]

    # row of (n, m, s) in value laid out as [N, M, S, D]
    rows = value.permute(0, 2, 1, 3).reshape(-1, D)
    base = (torch.arange(N, device=value.device).view(N, 1) * M
            + torch.arange(M, device=value.device).view(1, M)) * S  # [N, M]
    base = base.view(N, 1, M, 1, 1)
    weights = attention_weights.to(dtype)

    out = None
    for dy in (0, 1):
        for dx in (0, 1):
            x, y = x0 + dx, y0 + dy
            inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
            corner = (fx if dx else 1 - fx) * (fy if dy else 1 - fy)
            corner = torch.where(inside, corner * weights, torch.zeros_like(corner))  # [N, Lq, M, L, P]
            index = base + torch.where(inside, start + y * width + x, torch.zeros_like(x))
            # [N, M, Lq, L * P] -> gathered [N, M, Lq, L * P, D]
            index = index.permute(0, 2, 1, 3, 4).reshape(N, M, Lq, L * P)
            sampled = rows.index_select(0, index.reshape(-1)).view(N, M, Lq, L * P, D)
            corner = corner.permute(0, 2, 1, 3, 4).reshape(N, M, Lq, 1, L * P)
            term = torch.matmul(corner, sampled)  # [N, M, Lq, 1, D]
            out = term if out is None else out + term
    return out.view(N, M, Lq, D).permute(0, 2, 1, 3).reshape(N, Lq, M * D)
