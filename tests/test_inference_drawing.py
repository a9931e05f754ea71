"""`draw_detections`: threshold, names, and enlargement for small images."""

from __future__ import annotations

import torch
from PIL import Image

from dino_scale.engine.inference import draw_detections


def test_draws_boxes_above_threshold_enlarged(tmp_path):
    source = tmp_path / "in.png"
    Image.new("RGB", (40, 30), (0, 0, 0)).save(source)
    detections = {"scores": torch.tensor([0.9, 0.1]), "labels": torch.tensor([1, 2]),
                  "boxes": torch.tensor([[5.0, 5.0, 20.0, 15.0], [0.0, 0.0, 10.0, 10.0]])}
    out = tmp_path / "out.png"
    kept = draw_detections(source, detections, out, threshold=0.5, names={1: "square"}, scale=3.0)
    assert kept == [{"label": 1, "score": 0.8999999761581421, "box": [5.0, 5.0, 20.0, 15.0]}]
    drawn = Image.open(out).convert("RGB")
    assert drawn.size == (120, 90)
    assert drawn.getpixel((15, 30)) != (0, 0, 0)  # left edge of the box at x = 5 * 3
    assert drawn.getpixel((15, 40)) != (0, 0, 0)  # still the left edge (y 15..45), below the label
    assert drawn.getpixel((40, 38)) == (0, 0, 0)  # inside the box: untouched
    assert drawn.getpixel((2, 2)) == (0, 0, 0)  # the low-score box is not drawn
