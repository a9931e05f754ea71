"""Contrastive denoising (CDN) queries: noised copies of the ground truth fed to the decoder
beside the matching queries (DINO, Zhang et al. 2023, sec. 3.3).

Layout of the `pad_size` denoising queries of each image (the official `prepare_for_cdn`):
`num_groups` groups of `2 * max_boxes` slots; in group g, slot g*2*max_boxes + j holds the
positive copy of target j and slot g*2*max_boxes + max_boxes + j its negative copy; slots of
images with fewer boxes stay zero. Random numbers are drawn in the official order, so with
the same seed the noise is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dino_scale.models.layers import inverse_sigmoid


@dataclass
class DenoisingQueries:
    content: torch.Tensor  # [B, P, D] label embeddings of the (noised) labels
    boxes_unsigmoid: torch.Tensor  # [B, P, 4] inverse-sigmoid of the noised cxcywh boxes
    attn_mask: torch.Tensor  # [P + Q, P + Q] bool, True = may not attend
    meta: dict[str, int]  # pad_size P, num_groups G, single_pad P // G


def num_denoising_groups(dn_number: int, max_boxes: int) -> int:
    """Groups as the official code derives them: the pair count 2*dn_number is divided by
    2*max_boxes only when it is >= 100, i.e. dn_number >= 50 gives dn_number // max_boxes
    groups while a smaller dn_number gives 2*dn_number groups whatever the box count."""
    pairs = dn_number * 2
    if max_boxes == 0:
        return 1
    if pairs >= 100:
        pairs = pairs // (max_boxes * 2)
    elif pairs < 1:
        pairs = 1
    return max(pairs, 1)


def denoising_attn_mask(pad_size: int, num_groups: int, num_queries: int, device: torch.device) -> torch.Tensor:
    """[P + Q, P + Q] bool: matching queries never see denoising queries, denoising groups
    never see each other; denoising queries do see the matching queries."""
    size = pad_size + num_queries
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    mask[pad_size:, :pad_size] = True
    group = pad_size // num_groups
    for g in range(num_groups):
        rows = slice(g * group, (g + 1) * group)
        mask[rows, : g * group] = True
        mask[rows, (g + 1) * group : pad_size] = True
    return mask


def prepare_denoising(
    targets: list[dict[str, torch.Tensor]],
    dn_number: int,
    label_noise_ratio: float,
    box_noise_scale: float,
    num_classes: int,
    num_queries: int,
    label_enc: nn.Embedding,
) -> DenoisingQueries | None:
    """Build the CDN queries for a training batch; None when the batch has no boxes."""
    device = label_enc.weight.device
    known_num = [int(t["labels"].numel()) for t in targets]
    max_boxes = max(known_num, default=0)
    if max_boxes == 0:
        return None
    groups = num_denoising_groups(dn_number, max_boxes)
    copies = 2 * groups  # a positive and a negative copy per group
    labels = torch.cat([t["labels"] for t in targets]).to(device)
    boxes = torch.cat([t["boxes"] for t in targets]).to(device=device, dtype=torch.float32)
    batch_idx = torch.cat([torch.full_like(t["labels"].long(), i) for i, t in enumerate(targets)]).to(device)
    num_boxes = labels.numel()

    # every copy of the whole batch's boxes, copy c at [c * num_boxes, (c + 1) * num_boxes)
    noised_labels = labels.repeat(copies, 1).view(-1)
    copy_bid = batch_idx.repeat(copies, 1).view(-1)
    copy_boxes = boxes.repeat(copies, 1)
    noised_boxes = copy_boxes.clone()

    if label_noise_ratio > 0:
        p = torch.rand_like(noised_labels.float())
        flipped = torch.nonzero(p < (label_noise_ratio * 0.5)).view(-1)
        noised_labels = noised_labels.scatter(0, flipped, torch.randint_like(flipped, 0, num_classes))

    pad_size = max_boxes * copies
    if box_noise_scale > 0:
        positive = torch.arange(num_boxes, device=device).unsqueeze(0).repeat(groups, 1)
        positive = positive + (torch.arange(groups, device=device) * num_boxes * 2).unsqueeze(1)
        negative = positive.flatten() + num_boxes
        xyxy = torch.cat([copy_boxes[:, :2] - copy_boxes[:, 2:] / 2, copy_boxes[:, :2] + copy_boxes[:, 2:] / 2], 1)
        half_wh = torch.cat([copy_boxes[:, 2:] / 2, copy_boxes[:, 2:] / 2], 1)
        sign = torch.randint_like(copy_boxes, low=0, high=2, dtype=torch.float32) * 2.0 - 1.0
        # positives move each corner by < half the box size, negatives by [1, 2) times it
        magnitude = torch.rand_like(copy_boxes)
        magnitude[negative] += 1.0
        xyxy = (xyxy + magnitude * sign * half_wh * box_noise_scale).clamp(min=0.0, max=1.0)
        noised_boxes = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1)

    slot = torch.cat([torch.arange(n, device=device) for n in known_num])
    slot = torch.cat([slot + max_boxes * c for c in range(copies)])
    batch_size, dim = len(targets), label_enc.embedding_dim
    content = label_enc.weight.new_zeros(batch_size, pad_size, dim)
    boxes_unsig = label_enc.weight.new_zeros(batch_size, pad_size, 4)
    content = content.index_put((copy_bid, slot), label_enc(noised_labels.long()))
    boxes_unsig = boxes_unsig.index_put((copy_bid, slot), inverse_sigmoid(noised_boxes).to(boxes_unsig.dtype))
    return DenoisingQueries(
        content=content,
        boxes_unsigmoid=boxes_unsig,
        attn_mask=denoising_attn_mask(pad_size, groups, num_queries, device),
        meta={"pad_size": pad_size, "num_groups": groups, "single_pad": pad_size // groups},
    )
