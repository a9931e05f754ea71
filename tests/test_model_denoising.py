"""Contrastive denoising queries against hand-worked cases: group counts (including the
official quirk around dn_number 50), slot layout, the attention mask, and the noise bounds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dino_scale.models.denoising import denoising_attn_mask, num_denoising_groups, prepare_denoising
from dino_scale.models.layers import inverse_sigmoid

D = 8


def _targets():
    # image 0: one box; image 1: two boxes
    return [
        {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])},
        {"labels": torch.tensor([1, 4]), "boxes": torch.tensor([[0.4, 0.5, 0.2, 0.3], [0.6, 0.45, 0.3, 0.2]])},
    ]


@pytest.mark.parametrize(
    "dn_number, max_boxes, groups",
    [
        (100, 2, 50),  # 2*100 >= 100: divided by 2*max_boxes
        (50, 2, 25),  # 2*50 = 100: still divided
        (49, 2, 98),  # 2*49 < 100: NOT divided, 2*dn_number groups whatever the box count
        (20, 2, 40),
        (20, 7, 40),
        (100, 150, 1),  # 200 // 300 = 0 -> at least one group
        (100, 0, 1),
    ],
)
def test_number_of_groups_follows_the_official_rule(dn_number, max_boxes, groups):
    assert num_denoising_groups(dn_number, max_boxes) == groups


def test_attention_mask_hand_worked():
    # 2 groups of 2 * max_boxes(2) = 4 slots, 3 matching queries
    expected = [
        "....XXXX...",
        "....XXXX...",
        "....XXXX...",
        "....XXXX...",
        "XXXX.......",
        "XXXX.......",
        "XXXX.......",
        "XXXX.......",
        "XXXXXXXX...",
        "XXXXXXXX...",
        "XXXXXXXX...",
    ]
    mask = denoising_attn_mask(pad_size=8, num_groups=2, num_queries=3, device=torch.device("cpu"))
    got = ["".join("X" if v else "." for v in row) for row in mask.tolist()]
    assert got == expected


@pytest.mark.parametrize("dn_number, groups", [(100, 50), (1, 2)])
def test_layout_without_noise(dn_number, groups):
    torch.manual_seed(0)
    label_enc = nn.Embedding(6, D)
    targets = _targets()
    dn = prepare_denoising(targets, dn_number, 0.0, 0.0, num_classes=5, num_queries=3, label_enc=label_enc)
    single = 4  # 2 * max boxes
    assert dn.meta == {"pad_size": groups * single, "num_groups": groups, "single_pad": single}
    assert dn.content.shape == (2, groups * single, D)
    assert dn.boxes_unsigmoid.shape == (2, groups * single, 4)
    assert dn.attn_mask.shape == (groups * single + 3,) * 2
    for g in range(groups):
        for b, t in enumerate(targets):
            for j in range(2):
                for offset in (0, single // 2):  # positive, negative
                    slot = g * single + offset + j
                    if j < len(t["labels"]):
                        assert torch.equal(dn.content[b, slot], label_enc.weight[t["labels"][j]])
                        assert torch.allclose(dn.boxes_unsigmoid[b, slot], inverse_sigmoid(t["boxes"][j]))
                    else:  # padding slot of the image with one box
                        assert not dn.content[b, slot].any() and not dn.boxes_unsigmoid[b, slot].any()


def test_box_noise_bounds_positive_and_negative():
    torch.manual_seed(1)
    label_enc = nn.Embedding(6, D)
    targets = _targets()
    dn = prepare_denoising(targets, 100, 0.0, 1.0, num_classes=5, num_queries=3, label_enc=label_enc)
    boxes = dn.boxes_unsigmoid.sigmoid()
    checked = 0
    for b, t in enumerate(targets):
        for j, box in enumerate(t["boxes"]):
            half = torch.cat([box[2:], box[2:]]) / 2
            corners = torch.cat([box[:2] - box[2:] / 2, box[:2] + box[2:] / 2])
            for g in range(50):
                for offset, low, high in ((0, 0.0, 1.0), (2, 1.0, 2.0)):
                    noised = boxes[b, g * 4 + offset + j]
                    if (noised[2:] < 2e-3).any():
                        continue  # corners crossed: the width/height was clamped (as official)
                    moved = torch.cat([noised[:2] - noised[2:] / 2, noised[:2] + noised[2:] / 2]) - corners
                    ratio = moved.abs() / half  # no clamping: the boxes stay inside the image
                    assert (ratio >= low - 1e-4).all() and (ratio < high + 1e-4).all(), (b, j, g, offset, ratio)
                    checked += 1
    assert checked > 200


def test_label_noise_flips_about_the_expected_share():
    torch.manual_seed(2)
    label_enc = nn.Embedding(81, D)
    targets = [{"labels": torch.full((10,), 7), "boxes": torch.rand(10, 4) * 0.5 + 0.25}]
    dn = prepare_denoising(targets, 100, 0.5, 0.0, num_classes=80, num_queries=3, label_enc=label_enc)
    # each label is re-drawn with probability 0.25 (official: p < ratio / 2), uniformly
    same = (dn.content[0] == label_enc.weight[7]).all(-1).float().mean().item()
    assert 0.65 < same < 0.85


def test_no_boxes_gives_no_denoising():
    label_enc = nn.Embedding(6, D)
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    assert prepare_denoising(empty, 100, 0.5, 1.0, num_classes=5, num_queries=3, label_enc=label_enc) is None
