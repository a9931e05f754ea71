"""Model outputs between dtypes (batches move with `Batch.to`)."""

from __future__ import annotations

from typing import Any

import torch


def tree_map_tensors(obj: Any, fn) -> Any:
    """Apply `fn` to every tensor inside nested dicts/lists/tuples."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: tree_map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(tree_map_tensors(v, fn) for v in obj)
    return obj


def outputs_to_float(outputs: Any) -> Any:
    """Reduced-precision model outputs as fp32 for the loss (targets are fp32)."""
    return tree_map_tensors(
        outputs, lambda x: x.float() if x.is_floating_point() and x.dtype != torch.float32 else x
    )
