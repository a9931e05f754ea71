import pytest
import torch
import torchvision.ops as tv

from dino_scale.models import box_ops


def random_xyxy(n: int, generator: torch.Generator) -> torch.Tensor:
    top_left = torch.rand(n, 2, generator=generator)
    size = torch.rand(n, 2, generator=generator) * 0.5 + 0.01
    return torch.cat([top_left, top_left + size], dim=1)


def test_conversions_hand_worked():
    cxcywh = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.2, 0.2]])
    xyxy = torch.tensor([[0.4, 0.3, 0.6, 0.7], [0.0, 0.8, 0.2, 1.0]])
    torch.testing.assert_close(box_ops.box_cxcywh_to_xyxy(cxcywh), xyxy)
    torch.testing.assert_close(box_ops.box_xyxy_to_cxcywh(xyxy), cxcywh)
    # any leading shape
    batched = cxcywh.expand(3, 2, 4)
    assert box_ops.box_cxcywh_to_xyxy(batched).shape == (3, 2, 4)


def test_conversions_match_torchvision_and_round_trip():
    g = torch.Generator().manual_seed(0)
    xyxy = random_xyxy(50, g)
    cxcywh = box_ops.box_xyxy_to_cxcywh(xyxy)
    torch.testing.assert_close(cxcywh, tv.box_convert(xyxy, "xyxy", "cxcywh"))
    torch.testing.assert_close(box_ops.box_cxcywh_to_xyxy(cxcywh), xyxy)


def test_area_iou_giou_hand_worked():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [4.0, 0.0, 5.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    torch.testing.assert_close(box_ops.box_area(b), torch.tensor([4.0, 1.0, 4.0]))
    iou, union = box_ops.box_iou(a, b)
    # overlap 1, union 4 + 4 - 1 = 7; disjoint; identical
    torch.testing.assert_close(union, torch.tensor([[7.0, 5.0, 4.0]]))
    torch.testing.assert_close(iou, torch.tensor([[1 / 7, 0.0, 1.0]]), atol=1e-6, rtol=0)
    giou = box_ops.generalized_box_iou(a, b)
    # enclosing boxes: 3x3 = 9 -> 1/7 - 2/9; 5x2 = 10 -> 0 - 5/10; identical -> 1
    torch.testing.assert_close(
        giou, torch.tensor([[1 / 7 - 2 / 9, -0.5, 1.0]]), atol=1e-6, rtol=0
    )


def test_pairwise_matches_torchvision():
    g = torch.Generator().manual_seed(1)
    a, b = random_xyxy(7, g), random_xyxy(5, g)
    iou, _ = box_ops.box_iou(a, b)
    torch.testing.assert_close(iou, tv.box_iou(a, b), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        box_ops.generalized_box_iou(a, b), tv.generalized_box_iou(a, b), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(box_ops.box_area(a), tv.box_area(a))


def test_paired_equals_diagonal_of_pairwise():
    g = torch.Generator().manual_seed(2)
    a, b = random_xyxy(9, g), random_xyxy(9, g)
    iou, union = box_ops.paired_box_iou(a, b)
    full_iou, full_union = box_ops.box_iou(a, b)
    torch.testing.assert_close(iou, full_iou.diagonal())
    torch.testing.assert_close(union, full_union.diagonal())
    torch.testing.assert_close(
        box_ops.paired_generalized_box_iou(a, b), box_ops.generalized_box_iou(a, b).diagonal()
    )


def test_empty_inputs():
    a = torch.zeros(0, 4)
    b = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    assert box_ops.generalized_box_iou(a, b).shape == (0, 1)
    assert box_ops.generalized_box_iou(b, a).shape == (1, 0)
    assert box_ops.paired_generalized_box_iou(a, a).shape == (0,)


def test_zero_size_boxes_stay_finite():
    # a degenerate (zero-area) but valid box: the epsilon keeps IoU and GIoU finite
    point = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    giou = box_ops.generalized_box_iou(point, point)
    assert torch.isfinite(giou).all()


def test_inverted_boxes_rejected():
    bad = torch.tensor([[0.5, 0.5, 0.4, 0.9]])
    good = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="degenerate"):
        box_ops.generalized_box_iou(bad, good)
    with pytest.raises(ValueError, match="degenerate"):
        box_ops.paired_generalized_box_iou(good, bad)
    with pytest.raises(ValueError, match="shape"):
        box_ops.paired_generalized_box_iou(good, torch.zeros(2, 4))


def test_giou_gradient_flows():
    a = torch.tensor([[0.1, 0.1, 0.6, 0.5]], requires_grad=True)
    b = torch.tensor([[0.3, 0.2, 0.9, 0.8]])
    (1 - box_ops.paired_generalized_box_iou(a, b)).sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0


def test_nan_boxes_propagate_instead_of_raising():
    # a diverged prediction gives a NaN loss for the trainer to skip, not an exception
    nan = torch.tensor([[float("nan")] * 4])
    good = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    assert torch.isnan(box_ops.paired_generalized_box_iou(good, nan)).all()
    assert torch.isnan(box_ops.generalized_box_iou(nan, good)).all()
