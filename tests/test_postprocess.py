import pytest
import torch

from dino_scale.models.postprocess import PostProcess


def test_top_k_over_query_class_pairs_and_pixel_boxes():
    # 3 queries x 2 classes; query 1 is confident in both classes, so it yields two detections
    logits = torch.tensor([[[0.0, -3.0], [4.0, 2.0], [-1.0, 1.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.5, 0.5, 1.0], [0.9, 0.1, 0.2, 0.2]]])
    sizes = torch.tensor([[200, 100]])  # h, w
    (result,) = PostProcess(num_select=4)({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    assert result["labels"].tolist() == [0, 1, 1, 0]
    torch.testing.assert_close(result["scores"], torch.sigmoid(torch.tensor([4.0, 2.0, 1.0, 0.0])))
    expected = torch.tensor(
        [
            [0.0, 0.0, 50.0, 200.0],  # query 1: cx .25 w .5 -> x 0..0.5 of 100 px; full height 200
            [0.0, 0.0, 50.0, 200.0],
            [80.0, 0.0, 100.0, 40.0],  # query 2
            [40.0, 60.0, 60.0, 140.0],  # query 0
        ]
    )
    torch.testing.assert_close(result["boxes"], expected)
    assert result["labels"].dtype == torch.int64


def test_batch_sizes_and_default_count():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 100, 91, generator=g)
    boxes = torch.cat([torch.rand(2, 100, 2, generator=g) * 0.5 + 0.25, torch.rand(2, 100, 2, generator=g) * 0.4], -1)
    sizes = torch.tensor([[480, 640], [800, 600]])
    results = PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    assert len(results) == 2
    for image, result in enumerate(results):
        assert result["scores"].shape == result["labels"].shape == (300,)
        assert result["boxes"].shape == (300, 4)
        assert (result["scores"][:-1] >= result["scores"][1:]).all()
        # the best score is the global maximum over (query, class) pairs
        assert result["scores"][0] == torch.sigmoid(logits[image]).max()
        h, w = sizes[image].tolist()
        assert (result["boxes"] >= 0).all()
        assert (result["boxes"][:, [0, 2]] <= w).all() and (result["boxes"][:, [1, 3]] <= h).all()
        # every detection's box is its query's box, whichever class it came from
        flat = torch.sigmoid(logits[image]).flatten()
        query = torch.div(flat.topk(300).indices, 91, rounding_mode="floor")
        cx, cy, bw, bh = boxes[image, query].unbind(-1)
        torch.testing.assert_close(result["boxes"][:, 0], (cx - bw / 2) * w)
        torch.testing.assert_close(result["boxes"][:, 3], (cy + bh / 2) * h)


def test_fewer_candidates_than_num_select():
    logits = torch.zeros(1, 2, 3)
    boxes = torch.full((1, 2, 4), 0.5)
    (result,) = PostProcess(num_select=300)({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[10, 10]]))
    assert result["scores"].shape == (6,)


def test_bad_sizes_rejected():
    outputs = {"pred_logits": torch.zeros(2, 3, 4), "pred_boxes": torch.zeros(2, 3, 4)}
    with pytest.raises(ValueError, match="target_sizes"):
        PostProcess(5)(outputs, torch.tensor([[10, 10]]))
    with pytest.raises(ValueError, match="num_select"):
        PostProcess(0)
