"""The DINO forward: output contract and shapes, padding masks through every level,
encoder proposals on padding, training outputs with and without denoising, and gradients
reaching every trainable parameter."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dino_scale.config import load_config
from dino_scale.models import build_dino
from dino_scale.models.position_encoding import PositionEmbeddingSine
from dino_scale.models.transformer import encoder_output_proposals

REPO = Path(__file__).resolve().parents[1]
B, H, W = 2, 96, 128


def _small_cfg(*overrides: str):
    # the demo's reduced DINO (ResNet-18, d_model 64), with 5 levels so an extra level is
    # built from a built one, and few queries / dn groups for speed
    return load_config(REPO / "configs/demo/model_small.yaml", [
        "model.num_queries=20", "model.dn_number=3", "model.num_feature_levels=5", *overrides,
    ]).model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_dino(_small_cfg())


def _batch():
    torch.manual_seed(1)
    images = torch.randn(B, 3, H, W)
    masks = torch.zeros(B, H, W, dtype=torch.bool)
    masks[1, 64:, :] = True  # image 1 is 64 x 80
    masks[1, :, 80:] = True
    images[masks[:, None].expand_as(images)] = 0
    targets = [
        {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3]])},
        {"labels": torch.tensor([1, 5]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
    ]
    return images, masks, targets


def test_eval_outputs(model):
    images, masks, _ = _batch()
    model.eval()
    with torch.no_grad():
        out = model(images, masks)
    assert set(out) == {"pred_logits", "pred_boxes"}
    assert out["pred_logits"].shape == (B, 20, 11)
    assert out["pred_boxes"].shape == (B, 20, 4)
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    assert torch.isfinite(out["pred_logits"]).all()


def test_training_outputs_follow_the_contract(model):
    images, masks, targets = _batch()
    model.train()
    out = model(images, masks, targets)
    L = 3  # dec_layers
    groups = 6  # dn_number 3 < 50: 2 * 3 groups (official rule), each 2 * max boxes (2) slots
    P = groups * 4
    assert out["dn_meta"] == {"pad_size": P, "num_groups": groups, "single_pad": 4}
    assert out["pred_logits"].shape == (B, 20, 11) and out["pred_boxes"].shape == (B, 20, 4)
    assert len(out["aux_outputs"]) == L - 1
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (B, 20, 11) and aux["pred_boxes"].shape == (B, 20, 4)
    assert out["enc_outputs"]["pred_logits"].shape == (B, 20, 11)
    assert out["enc_outputs"]["pred_boxes"].shape == (B, 20, 4)
    assert len(out["dn_outputs"]) == L
    for dn in out["dn_outputs"]:
        assert dn["pred_logits"].shape == (B, P, 11) and dn["pred_boxes"].shape == (B, P, 4)


def test_matching_queries_do_not_depend_on_denoising_queries(model):
    """The attention mask hides every dn query from the matching queries: their outputs are
    the same with denoising as without (eval mode, where no dn query exists)."""
    images, masks, targets = _batch()
    with torch.no_grad():
        model.train()
        with_dn = model(images, masks, targets)
        without = model(images, masks)
        model.eval()
    assert "dn_outputs" in with_dn and "dn_outputs" not in without
    assert torch.allclose(with_dn["pred_logits"], without["pred_logits"], atol=1e-5)
    assert torch.allclose(with_dn["pred_boxes"], without["pred_boxes"], atol=1e-6)


@pytest.mark.parametrize("targets", [None, "empty"])
def test_training_without_boxes_has_no_denoising(model, targets):
    images, masks, _ = _batch()
    if targets == "empty":
        targets = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * B
    model.train()
    with torch.no_grad():
        out = model(images, masks, targets)
    model.eval()
    assert "dn_outputs" not in out and "dn_meta" not in out
    assert len(out["aux_outputs"]) == 2 and "enc_outputs" in out


def test_padding_masks_reach_every_level(model):
    images, masks, _ = _batch()
    with torch.no_grad():
        srcs, level_masks, pos = model._multi_level_features(images, masks)
    assert len(srcs) == len(level_masks) == len(pos) == 5
    for src, m, p in zip(srcs, level_masks, pos):
        h, w = src.shape[-2:]
        assert m.shape == (B, h, w) and p.shape == (B, 64, h, w)
        assert not m[0].any()
        # image 1's valid area is the top-left 2/3 x 5/8: nearest-neighbour downsampling
        rows = torch.arange(h) * H // h
        cols = torch.arange(w) * W // w
        assert torch.equal(m[1], masks[1][rows][:, cols])


def test_position_encoding_is_normalised_by_the_valid_extent():
    mask = torch.zeros(1, 4, 6, dtype=torch.bool)
    mask[:, :, 4:] = True  # 4 x 4 valid
    pe = PositionEmbeddingSine(num_pos_feats=8, temperature_h=20, temperature_w=20)(mask)
    assert pe.shape == (1, 16, 4, 6)
    # pixel (row 1, col 2): y = 2 / 4 * 2pi, x = 3 / 4 * 2pi; channel 0 sin(y), 1 cos(y / 20^(2/8))
    y, x = 2 / (4 + 1e-6) * 2 * math.pi, 3 / (4 + 1e-6) * 2 * math.pi
    assert pe[0, 0, 1, 2].item() == pytest.approx(math.sin(y), abs=1e-6)
    assert pe[0, 1, 1, 2].item() == pytest.approx(math.cos(y), abs=1e-6)
    assert pe[0, 3, 1, 2].item() == pytest.approx(math.cos(y / 20 ** (2 / 8)), abs=1e-6)
    assert pe[0, 8, 1, 2].item() == pytest.approx(math.sin(x), abs=1e-6)


def test_encoder_proposals_mask_padding_and_borders():
    shapes = torch.tensor([[4, 4], [2, 2]])
    padding = torch.zeros(1, 20, dtype=torch.bool)
    padding[0, [3, 7, 11, 15]] = True  # level 0: column 3 is padding, 4 x 3 valid
    memory = torch.ones(1, 20, 8)
    out_memory, proposals = encoder_output_proposals(memory, padding, shapes)
    sig = proposals.sigmoid()
    # level 0 token (row 1, col 2): centre ((2 + .5) / 3, (1 + .5) / 4), size 0.05
    assert torch.allclose(sig[0, 6], torch.tensor([2.5 / 3, 0.375, 0.05, 0.05]), atol=1e-6)
    # level 1 size 0.1
    assert torch.allclose(sig[0, 16, 2:], torch.tensor([0.1, 0.1]), atol=1e-6)
    assert torch.isinf(proposals[0, 3]).all() and not out_memory[0, 3].any()
    assert torch.isfinite(proposals[0, 6]).all() and out_memory[0, 6].eq(1).all()
    # a proposal within 0.01 of the border is invalid too: a 1 x 60 level, first centre 0.5/60
    out_memory, proposals = encoder_output_proposals(torch.ones(1, 60, 8), torch.zeros(1, 60, dtype=torch.bool),
                                                     torch.tensor([[1, 60]]))
    assert torch.isinf(proposals[0, 0]).all() and not out_memory[0, 0].any()
    assert torch.isfinite(proposals[0, 1]).all()


def test_gradients_reach_every_trainable_parameter():
    torch.manual_seed(0)
    model = build_dino(_small_cfg("model.backbone.freeze_stem_and_first_stage=true")).train()
    with torch.no_grad():  # zero-initialised layers (box heads, MSDA offsets) would hide paths
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    images, masks, targets = _batch()
    out = model(images, masks, targets)
    heads = [out, *out["aux_outputs"], out["enc_outputs"], *out["dn_outputs"]]
    loss = sum(h["pred_logits"].sigmoid().mean() + h["pred_boxes"].mean() for h in heads)
    loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("backbone.body.conv1", "backbone.body.bn1", "backbone.body.layer1."))
                          for n in frozen)
    no_grad = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"no gradient reached {no_grad}"


def test_bf16_parameters_with_fp32_buffers_run_forward_and_backward():
    """DeepSpeed bf16 casts parameters and inputs but leaves buffers (frozen BatchNorm
    statistics) in fp32."""
    torch.manual_seed(0)
    model = build_dino(_small_cfg("model.backbone.frozen_batchnorm=true")).train()
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    images, masks, targets = _batch()
    out = model(images.to(torch.bfloat16), masks, targets)
    heads = [out, *out["aux_outputs"], out["enc_outputs"], *out["dn_outputs"]]
    loss = sum(h["pred_logits"].float().sigmoid().mean() + h["pred_boxes"].float().mean() for h in heads)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.class_embed.weight.grad is not None and model.class_embed.weight.grad.dtype == torch.bfloat16
