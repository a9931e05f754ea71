"""Backbones: frozen BatchNorm numerics and freezing, timm ResNet-50 against torchvision's,
and our Swin (timm modules, official padding order) against the official detection Swin's
recorded outputs at a size that is a multiple of neither the patch nor the window."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

from dino_scale.config import BackboneConfig
from dino_scale.models.backbone import (
    FrozenBatchNorm2d,
    ResNetBackbone,
    SwinBackbone,
    backbone_family,
    load_backbone_weights,
)
from dino_scale.models.dino import official_to_ours_key
from dino_scale.models.swin import relative_position_index

DATA = Path(__file__).resolve().parent / "data"


def test_frozen_batchnorm_matches_batchnorm_eval_and_loads_its_state():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(), bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
    frozen = FrozenBatchNorm2d(6)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is dropped
    x = torch.randn(2, 6, 5, 5)
    assert torch.allclose(frozen(x), bn(x), atol=1e-5)
    # the official formula, bit for bit
    scale = frozen.weight * (frozen.running_var + 1e-5).rsqrt()
    expected = x * scale[:, None, None] + (frozen.bias - frozen.running_mean * scale)[:, None, None]
    assert torch.equal(frozen(x), expected)
    assert not list(frozen.parameters())


def test_resnet50_matches_torchvision_and_freezes_stem_and_layer1(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(norm_layer=torchvision.ops.FrozenBatchNorm2d).eval()
    with torch.no_grad():
        for name, t in reference.state_dict().items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
            elif t.is_floating_point() and "bn" in name or "downsample.1" in name:
                t.normal_(0.2, 0.1)
    weights = tmp_path / "resnet50_torchvision.pth"
    torch.save(reference.state_dict(), weights)
    backbone = ResNetBackbone(BackboneConfig(name="resnet50", return_stages=[1, 2, 3]))
    load_backbone_weights(backbone, weights)
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        ours = backbone.eval()(x)
        body = torchvision.models._utils.IntermediateLayerGetter(
            reference, {"layer2": "0", "layer3": "1", "layer4": "2"})
        theirs = list(body(x).values())
    assert backbone.num_channels == [512, 1024, 2048]
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
    frozen = {n for n, p in backbone.body.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in backbone.body.named_parameters() if p.requires_grad}
    assert frozen and all(n.startswith(("conv1.", "layer1.")) for n in frozen)
    assert trainable and all(n.startswith(("layer2.", "layer3.", "layer4.")) for n in trainable)


def _tiny_swin_cfg(**kw) -> BackboneConfig:
    return BackboneConfig(
        name="swin_tiny_patch4_window7_224", return_stages=[1, 2, 3], frozen_batchnorm=False,
        freeze_stem_and_first_stage=False, drop_path_rate=0.0,
        timm_kwargs={"embed_dim": 16, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 4, 8], "window_size": 4}, **kw,
    )


def _load_official_swin(backbone: SwinBackbone, recorded: dict) -> None:
    state = {}
    for key, tensor in recorded.items():
        if not key.startswith("official."):
            continue
        official = "backbone.0." + key[len("official."):]
        if official.endswith("relative_position_index"):
            assert torch.equal(tensor.long(), relative_position_index(4))
            continue
        state[official_to_ours_key(official)[len("backbone."):]] = tensor.float()
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("relative_position_index") for k in missing), (missing, unexpected)


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_swin_matches_official_detection_swin(grad_checkpointing):
    recorded = load_file(DATA / "official_swin_tiny.safetensors")
    backbone = SwinBackbone(_tiny_swin_cfg(grad_checkpointing=grad_checkpointing))
    _load_official_swin(backbone, recorded)
    assert backbone.num_channels == [32, 64, 128]
    x = recorded["input"].float()
    with torch.no_grad():
        outs = backbone.eval()(x)
    for i, out in enumerate(outs):
        expected = recorded[f"output{i + 1}"]
        assert out.shape == expected.shape
        assert (out - expected).abs().max().item() < 1e-4
    # training mode (with or without activation checkpointing): gradients reach every parameter
    backbone.train()
    loss = sum(o.square().mean() for o in backbone(x))
    loss.backward()
    assert all(p.grad is not None for p in backbone.parameters())


def test_swin_pretrained_weights_in_the_official_classification_layout(tmp_path):
    """An official (Microsoft) Swin classification checkpoint: PatchMerging at the end of a
    stage, a final norm and head, derived buffers; loads into the timm modules."""
    recorded = load_file(DATA / "official_swin_tiny.safetensors")
    state = {k[len("official."):]: v.float() for k, v in recorded.items()
             if k.startswith("official.") and not k.startswith("official.norm")}
    state["norm.weight"] = torch.ones(128)
    state["head.weight"] = torch.zeros(10, 128)
    path = tmp_path / "swin_classification.pth"
    torch.save({"model": state}, path)
    backbone = SwinBackbone(_tiny_swin_cfg(pretrained_path=str(path)))
    load_backbone_weights(backbone, path)
    reference = SwinBackbone(_tiny_swin_cfg())
    _load_official_swin(reference, recorded)
    ours, theirs = backbone.body.state_dict(), reference.body.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_backbone_families_are_explicit_and_other_names_are_refused():
    assert backbone_family("resnet50").model is ResNetBackbone
    assert backbone_family("resnext50_32x4d").model is ResNetBackbone
    assert backbone_family("swin_large_patch4_window12_384").model is SwinBackbone
    with pytest.raises(ValueError, match="'convnext_tiny' belongs to no supported backbone family"):
        backbone_family("convnext_tiny")  # was silently built as a frozen ResNet-style body
    with pytest.raises(ValueError, match="'resnet_no_such_model' is not a timm model"):
        backbone_family("resnet_no_such_model")
