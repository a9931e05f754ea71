import itertools
import math

import pytest
import torch

from dino_scale.config import ModelConfig
from dino_scale.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from dino_scale.models.matcher import HungarianMatcher, build_matcher, focal_class_cost


def random_problem(batch: int, queries: int, classes: int, sizes: list[int], seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, queries, classes, generator=g) * 2
    boxes = torch.cat(
        [torch.rand(batch, queries, 2, generator=g) * 0.6 + 0.2,
         torch.rand(batch, queries, 2, generator=g) * 0.3 + 0.05],
        dim=-1,
    )
    targets = []
    for n in sizes:
        targets.append(
            {
                "labels": torch.randint(0, classes, (n,), generator=g),
                "boxes": torch.cat(
                    [torch.rand(n, 2, generator=g) * 0.6 + 0.2, torch.rand(n, 2, generator=g) * 0.3 + 0.05], dim=-1
                ),
            }
        )
    return {"pred_logits": logits, "pred_boxes": boxes}, targets


def pair_cost(logit, box, label, tgt_box, alpha=0.25, gamma=2.0, wc=2.0, wb=5.0, wg=2.0) -> float:
    """The matching cost of one (query, target) pair, written out from the DINO definition."""
    p = torch.sigmoid(logit[label]).item()
    pos = alpha * (1 - p) ** gamma * -math.log(p + 1e-8)
    neg = (1 - alpha) * p**gamma * -math.log(1 - p + 1e-8)
    l1 = (box - tgt_box).abs().sum().item()
    giou = generalized_box_iou(box_cxcywh_to_xyxy(box[None]), box_cxcywh_to_xyxy(tgt_box[None])).item()
    return wc * (pos - neg) + wb * l1 - wg * giou


def brute_force(logits, boxes, target) -> float:
    """Lowest total cost over every injective assignment of targets to queries."""
    n, q = len(target["labels"]), logits.shape[0]
    costs = [
        [pair_cost(logits[i], boxes[i], target["labels"][j], target["boxes"][j]) for j in range(n)]
        for i in range(q)
    ]
    if q >= n:
        return min(sum(costs[perm[j]][j] for j in range(n)) for perm in itertools.permutations(range(q), n))
    return min(sum(costs[i][perm[i]] for i in range(q)) for perm in itertools.permutations(range(n), q))


def assignment_cost(logits, boxes, target, rows, cols) -> float:
    return sum(
        pair_cost(logits[i], boxes[i], target["labels"][j], target["boxes"][j])
        for i, j in zip(rows.tolist(), cols.tolist())
    )


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force(seed):
    matcher = build_matcher(ModelConfig())
    outputs, targets = random_problem(2, 4, 5, [3, 4], seed)
    indices = matcher(outputs, targets)
    for image, (rows, cols) in enumerate(indices):
        target = targets[image]
        n = len(target["labels"])
        assert rows.dtype == cols.dtype == torch.int64
        assert len(rows) == len(cols) == min(4, n)
        assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        got = assignment_cost(outputs["pred_logits"][image], outputs["pred_boxes"][image], target, rows, cols)
        best = brute_force(outputs["pred_logits"][image], outputs["pred_boxes"][image], target)
        assert got == pytest.approx(best, abs=1e-4)


def test_more_targets_than_queries_matches_every_query():
    matcher = build_matcher(ModelConfig())
    outputs, targets = random_problem(1, 3, 4, [5], seed=7)
    (rows, cols), = matcher(outputs, targets)
    assert sorted(rows.tolist()) == [0, 1, 2] and len(set(cols.tolist())) == 3
    got = assignment_cost(outputs["pred_logits"][0], outputs["pred_boxes"][0], targets[0], rows, cols)
    assert got == pytest.approx(brute_force(outputs["pred_logits"][0], outputs["pred_boxes"][0], targets[0]), abs=1e-4)


def test_cost_matrix_entries_equal_the_definition():
    matcher = HungarianMatcher(cost_class=1.5, cost_bbox=3.0, cost_giou=0.5, focal_alpha=0.3, focal_gamma=1.5)
    outputs, targets = random_problem(2, 3, 4, [2, 1], seed=3)
    cost = matcher.cost_matrix(outputs["pred_logits"], outputs["pred_boxes"], targets)
    assert cost.shape == (2, 3, 3)
    all_labels = torch.cat([t["labels"] for t in targets])
    all_boxes = torch.cat([t["boxes"] for t in targets])
    for b in range(2):
        for q in range(3):
            for t in range(3):
                expected = pair_cost(
                    outputs["pred_logits"][b, q], outputs["pred_boxes"][b, q], all_labels[t], all_boxes[t],
                    alpha=0.3, gamma=1.5, wc=1.5, wb=3.0, wg=0.5,
                )
                assert cost[b, q, t].item() == pytest.approx(expected, abs=1e-5)


def test_focal_class_cost_prefers_confident_right_class():
    prob = torch.tensor([[0.9, 0.1], [0.1, 0.9]])
    cost = focal_class_cost(prob, torch.tensor([0]), alpha=0.25, gamma=2.0)
    assert cost[0, 0] < 0 < cost[1, 0]


def test_the_right_query_wins():
    # query 2 has the target's class and box exactly; the others are far off
    logits = torch.full((1, 4, 3), -5.0)
    logits[0, 2, 1] = 5.0
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1], [0.5, 0.5, 0.3, 0.2], [0.1, 0.9, 0.1, 0.1]]])
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.2]])}]
    (rows, cols), = build_matcher(ModelConfig())({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert rows.tolist() == [2] and cols.tolist() == [0]


def test_zero_targets():
    matcher = build_matcher(ModelConfig())
    outputs, targets = random_problem(3, 4, 5, [0, 2, 0], seed=4)
    indices = matcher(outputs, targets)
    assert [len(r) for r, _ in indices] == [0, 2, 0]
    assert all(r.dtype == torch.int64 for r, _ in indices)
    outputs, targets = random_problem(2, 4, 5, [0, 0], seed=5)
    indices = matcher(outputs, targets)
    assert all(len(r) == 0 and len(c) == 0 for r, c in indices)


def test_bad_input_is_a_clear_error():
    matcher = build_matcher(ModelConfig())
    outputs, targets = random_problem(1, 4, 5, [2], seed=6)
    targets[0]["labels"][0] = 5
    with pytest.raises(ValueError, match="labels"):
        matcher(outputs, targets)
    with pytest.raises(ValueError, match="targets for a batch"):
        matcher(outputs, targets + targets)
    with pytest.raises(ValueError, match="zero"):
        HungarianMatcher(0, 0, 0)


def test_non_finite_predictions_still_match():
    # a diverging step: the matcher assigns anyway (the loss turns NaN and the trainer skips
    # the step on every rank) instead of raising on one rank
    matcher = build_matcher(ModelConfig())
    outputs, targets = random_problem(1, 4, 5, [2], seed=6)
    outputs["pred_logits"][0, 1, 0] = float("nan")
    outputs["pred_boxes"][0, 2] = float("inf")
    (rows, cols), = matcher(outputs, targets)
    assert len(rows) == 2 and sorted(cols.tolist()) == [0, 1]
