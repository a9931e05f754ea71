"""Multi-scale deformable attention: the native op and its pure-PyTorch reference.

`ms_deform_attn` runs the native kernels (ops/ at the repository root, registered as
torch.ops.dino_scale.ms_deform_attn_forward/backward) when they are available for the
input's device, and otherwise the reference, with a warning that names what fell back.
`ms_deform_attn_gather` is the same op from indexing and arithmetic (for ONNX export).
`NATIVE` says how the native op was loaded: "installed", "jit" or None.
"""

from __future__ import annotations

import warnings

import torch

from dino_scale.ops import native
from dino_scale.ops.gather import ms_deform_attn_gather
from dino_scale.ops.reference import ms_deform_attn_reference

NATIVE, _NATIVE_ERROR = native.load()
# Device types with a native kernel, looked up once (torch.compile cannot trace the query).
_NATIVE_DEVICES: frozenset[str] = frozenset()
if NATIVE is not None:
    native.register_python_kernels()
    _NATIVE_DEVICES = frozenset(
        {"meta"} | {d for d in ("cpu", "cuda") if native.has_kernel(d.upper())}
    )
else:
    warnings.warn(
        "dino_scale.ops: native multi-scale deformable attention unavailable, "
        f"ms_deform_attn falls back to the slow grid_sample reference ({_NATIVE_ERROR})",
        RuntimeWarning,
        stacklevel=2,
    )

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_warned_devices: set[str] = set()


def accumulate_dtype(value_dtype: torch.dtype) -> torch.dtype:
    """Dtype the kernels accumulate in, and of sampling_locations / attention_weights."""
    return torch.float64 if value_dtype == torch.float64 else torch.float32


def _check_inputs(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> None:
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be [N, S, M, D], got {tuple(value.shape)}")
    if value.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"ms_deform_attn: value must be a float tensor, got {value.dtype}")
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(
            f"ms_deform_attn: spatial_shapes must be [L, 2], got {tuple(spatial_shapes.shape)}"
        )
    levels = spatial_shapes.shape[0]
    if level_start_index.shape != (levels,):
        raise ValueError(
            f"ms_deform_attn: level_start_index must be [L] with L = {levels}, "
            f"got {tuple(level_start_index.shape)}"
        )
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if t.dtype != torch.int64:
            raise TypeError(f"ms_deform_attn: {name} must be int64, got {t.dtype}")
    batch, _, heads, _ = value.shape
    loc = sampling_locations
    if loc.dim() != 6 or (loc.shape[0], loc.shape[2], loc.shape[3], loc.shape[5]) != (
        batch, heads, levels, 2,
    ):
        raise ValueError(
            f"ms_deform_attn: sampling_locations must be [N, Lq, M, L, P, 2] = "
            f"[{batch}, Lq, {heads}, {levels}, P, 2], got {tuple(loc.shape)}"
        )
    expected = (batch, loc.shape[1], heads, levels, loc.shape[4])
    if tuple(attention_weights.shape) != expected:
        raise ValueError(
            f"ms_deform_attn: attention_weights must be [N, Lq, M, L, P] = {list(expected)}, "
            f"got {tuple(attention_weights.shape)}"
        )
    for name, t in (("sampling_locations", loc), ("attention_weights", attention_weights)):
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"ms_deform_attn: {name} must be a float tensor, got {t.dtype}")
    for name, t in (
        ("spatial_shapes", spatial_shapes),
        ("level_start_index", level_start_index),
        ("sampling_locations", loc),
        ("attention_weights", attention_weights),
    ):
        if t.device != value.device:
            raise ValueError(
                f"ms_deform_attn: {name} is on {t.device} but value is on {value.device}"
            )


def _native_available(device: torch.device) -> bool:
    if NATIVE is not None and device.type in _NATIVE_DEVICES:
        return True
    if device.type not in _warned_devices:
        _warned_devices.add(device.type)
        why = "not loaded: " + _NATIVE_ERROR if NATIVE is None else f"built without {device.type}"
        warnings.warn(
            f"dino_scale.ops.ms_deform_attn: native op {why}; using the grid_sample reference "
            f"on {device.type}",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention (Deformable DETR eq. 3, the DINO encoder/decoder op).

    value:              [N, S, M, D]        float32/float64/bfloat16/float16
    spatial_shapes:     [L, 2] int64        (H_l, W_l), on value's device
    level_start_index:  [L] int64           offset of level l in S, on value's device
    sampling_locations: [N, Lq, M, L, P, 2] (x, y) in [0, 1]; outside samples zeros
    attention_weights:  [N, Lq, M, L, P]
    returns:            [N, Lq, M * D]      in value's dtype

    Bilinear sampling as grid_sample(align_corners=False, padding_mode="zeros"). Kernels
    accumulate in float32 (float64 for float64 value); sampling_locations and
    attention_weights are cast to that dtype (differentiably), so e.g. a bfloat16 value with
    float32 locations from autocast is fine.
    """
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    acc = accumulate_dtype(value.dtype)
    sampling_locations = sampling_locations.to(acc)
    attention_weights = attention_weights.to(acc)
    if _native_available(value.device):
        return torch.ops.dino_scale.ms_deform_attn_forward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    out = ms_deform_attn_reference(
        value.to(acc), spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    return out.to(value.dtype)


__all__ = ["NATIVE", "accumulate_dtype", "ms_deform_attn", "ms_deform_attn_gather", "ms_deform_attn_reference"]
