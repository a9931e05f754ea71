"""Moving batches and model outputs between devices and dtypes."""

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


def batch_to(batch: Any, device: torch.device, dtype: torch.dtype = torch.float32
             ) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
    """(images in `dtype`, masks, targets) of a `dino_scale.data.Batch` on `device`."""
    images = batch.images.to(device=device, dtype=dtype, non_blocking=True)
    masks = batch.masks.to(device, non_blocking=True)
    targets = [tree_map_tensors(t, lambda x: x.to(device, non_blocking=True)) for t in batch.targets]
    return images, masks, targets


def outputs_to_float(outputs: Any) -> Any:
    """Reduced-precision model outputs as fp32 for the loss (targets are fp32)."""
    return tree_map_tensors(
        outputs, lambda x: x.float() if x.is_floating_point() and x.dtype != torch.float32 else x
    )
