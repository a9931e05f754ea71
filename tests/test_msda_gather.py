"""The gather formulation of multi-scale deformable attention (what ONNX export uses) against
the grid_sample reference, and a DINO running on it against the same DINO on the native op."""

from __future__ import annotations

import pytest
import torch

from dino_scale.config import load_config
from dino_scale.models import build_dino
from dino_scale.ops import ms_deform_attn_gather, ms_deform_attn_reference
from test_msda import make_inputs


@pytest.mark.parametrize("levels", [((4, 5), (2, 3)), ((6, 8), (3, 4), (2, 2), (1, 1)), ((1, 7),)])
@pytest.mark.parametrize("margin", [0.0, 0.25, 2.0])
def test_gather_equals_reference_float64(levels, margin):
    inputs = make_inputs(batch=2, queries=7, heads=3, channels=5, levels=levels, points=3, margin=margin)
    torch.testing.assert_close(ms_deform_attn_gather(*inputs), ms_deform_attn_reference(*inputs),
                               rtol=0, atol=1e-12)


def test_gather_on_non_finite_and_far_locations_samples_nothing():
    value, shapes, starts, locations, weights = make_inputs(levels=((4, 5), (2, 3)))
    locations = locations.clone()
    locations[0, 0, 0, 0, 0] = torch.tensor([float("nan"), 0.5])
    locations[0, 1, 1, 1, 1] = torch.tensor([0.5, float("inf")])
    locations[1, 2, 0, 0, 1] = torch.tensor([1e30, -1e30])  # would overflow an int64 cast unclamped
    torch.testing.assert_close(ms_deform_attn_gather(value, shapes, starts, locations, weights),
                               ms_deform_attn_reference(value, shapes, starts, locations, weights),
                               rtol=0, atol=1e-12)
    assert ms_deform_attn_gather(value, shapes, starts, locations, weights).isfinite().all()


def test_gather_float32_within_float_rounding_of_reference():
    inputs = make_inputs(dtype=torch.float32, levels=((16, 20), (8, 10), (4, 5), (2, 3)), queries=50,
                         heads=8, channels=32, points=4)
    out = ms_deform_attn_gather(*inputs)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ms_deform_attn_reference(*inputs), rtol=1e-5, atol=1e-5)


def test_dino_with_gather_equals_dino_with_native_op():
    cfg = load_config("configs/demo/finetune.yaml").model
    cfg.backbone.pretrained_path = None
    torch.manual_seed(0)
    native = build_dino(cfg).eval()
    cfg.msda_impl = "gather"
    gather = build_dino(cfg).eval()
    gather.load_state_dict(native.state_dict())
    images = torch.randn(2, 3, 96, 128)
    masks = torch.zeros(2, 96, 128, dtype=torch.bool)
    masks[1, :, 100:] = True
    with torch.no_grad():
        a, b = native(images, masks), gather(images, masks)
    torch.testing.assert_close(b["pred_logits"], a["pred_logits"], rtol=0, atol=1e-4)
    torch.testing.assert_close(b["pred_boxes"], a["pred_boxes"], rtol=0, atol=1e-5)
