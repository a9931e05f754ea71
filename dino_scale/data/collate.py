"""`Batch`: images zero-padded to the batch's largest size with a padding mask."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Batch:
    """images float32 [B, 3, H, W] (ImageNet-normalised, zero padding); masks bool [B, H, W]
    (True on padding); targets: B dicts with labels int64 [n], boxes float32 [n, 4]
    (normalised cxcywh of the unpadded image), image_id, orig_size [2], size [2] (h, w)."""

    images: torch.Tensor
    masks: torch.Tensor
    targets: list[dict[str, torch.Tensor]]

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None, non_blocking: bool = False) -> Batch:
        """On `device`, images also in `dtype` (masks and targets keep theirs)."""
        return Batch(
            self.images.to(device=device, dtype=dtype, non_blocking=non_blocking),
            self.masks.to(device, non_blocking=non_blocking),
            [{k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
             for t in self.targets],
        )

    def pin_memory(self) -> Batch:
        return Batch(self.images.pin_memory(), self.masks.pin_memory(),
                     [{k: v.pin_memory() for k, v in t.items()} for t in self.targets])


def collate(samples: list[tuple[torch.Tensor, dict[str, Any]]]) -> Batch:
    """[(image [3, h_i, w_i], target)] -> Batch padded to (max h_i, max w_i)."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    height = max(image.shape[1] for image, _ in samples)
    width = max(image.shape[2] for image, _ in samples)
    images = torch.zeros(len(samples), 3, height, width, dtype=torch.float32)
    masks = torch.ones(len(samples), height, width, dtype=torch.bool)
    for i, (image, _) in enumerate(samples):
        images[i, :, : image.shape[1], : image.shape[2]].copy_(image)
        masks[i, : image.shape[1], : image.shape[2]] = False
    return Batch(images, masks, [target for _, target in samples])
