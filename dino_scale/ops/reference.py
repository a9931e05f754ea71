"""Pure-PyTorch multi-scale deformable attention: the oracle for the native op and its
fallback where the native op is not built."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention through `grid_sample`.

    value:              [N, S, M, D]        S = sum of H_l * W_l over levels
    spatial_shapes:     [L, 2] int64        (H_l, W_l)
    level_start_index:  [L] int64           offset of level l in S (unused: implied by shapes)
    sampling_locations: [N, Lq, M, L, P, 2] (x, y) in [0, 1]; outside (or non-finite) samples
                                            zeros
    attention_weights:  [N, Lq, M, L, P]
    returns:            [N, Lq, M * D]

    Bilinear interpolation with `align_corners=False`: pixel (i, j) of a level has its
    centre at ((j + 0.5) / W, (i + 0.5) / H).
    """
    del level_start_index
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    # A non-finite location samples nothing, as in the native kernels (grid_sample would
    # give NaN): it moves far outside the map, and `where` gives it a zero gradient.
    finite = sampling_locations.isfinite().all(-1, keepdim=True)
    grids = torch.where(finite, grids, torch.full_like(grids, -3.0))
    sampled = []
    for level, (h, w) in enumerate(shapes):
        # [N, H*W, M, D] -> [N*M, D, H, W]
        v = per_level[level].flatten(2).transpose(1, 2).reshape(N * M, D, h, w)
        # [N, Lq, M, P, 2] -> [N*M, Lq, P, 2]
        g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # -> [N*M, D, Lq, P]
        sampled.append(
            F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # [N, Lq, M, L, P] -> [N*M, 1, Lq, L*P]
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # [N*M, D, Lq]
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous()
