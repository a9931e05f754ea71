"""Official DINO checkpoints <-> ours: every official key of the R50 and Swin-L 4-scale
models (the reference TSV lists) maps to one of our tensors of the same shape, conversion
round-trips, and unsafe pickles are refused unless flagged."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest
import torch

from dino_scale.checkpoint_convert import main
from dino_scale.config import load_config
from dino_scale.models.dino import official_to_ours_key, ours_to_official_keys
from dino_scale.models.summary import build_on_meta, count_parameters
from dino_scale.models.swin import relative_position_index
from dino_scale.weights import (
    CheckpointError,
    load_model,
    official_to_ours,
    ours_to_official,
    read_official,
    read_weights,
)

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"
TINY = REPO / "tests" / "data" / "official_dino_tiny"


def _official_shapes(name: str) -> dict[str, tuple[int, ...]]:
    path = REFERENCE / f"official_dino_4scale_{name}_keys.tsv"
    if not path.is_file():
        pytest.skip(f"reference key list not found: {path}")
    shapes = {}
    for line in path.read_text().splitlines():
        key, shape = line.split("\t")
        shapes[key] = tuple(ast.literal_eval(shape))
    return shapes


@pytest.mark.parametrize(
    "name, config, overrides, params",
    [
        ("r50", "configs/dino_r50_4scale_coco.yaml", [], 46_893_182),
        # the official Swin-L figure (217.2M) is for the 91-class COCO head
        ("swinl", "configs/pretrain_o365_swinl.yaml", ["model.num_classes=91"], 217_230_066),
    ],
)
def test_every_official_key_maps_to_one_of_ours(name, config, overrides, params):
    official = _official_shapes(name)
    model = build_on_meta(load_config(REPO / config, overrides).model)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    buffers = {k: tuple(v.shape) for k, v in model.named_buffers()}  # incl. non-persistent
    targets: dict[str, set[str]] = {}
    for key, shape in official.items():
        mapped = official_to_ours_key(key)
        if key.endswith("relative_position_index"):
            # derived constant: our (non-persistent) buffer of the same shape
            assert buffers.get(mapped) == shape, (key, mapped)
            continue
        assert mapped in ours, f"official {key} -> {mapped}: not in our model"
        assert ours[mapped] == shape, f"{key} {shape} -> {mapped} {ours[mapped]}"
        targets.setdefault(mapped, set()).add(key)
    assert set(targets) == set(ours), f"ours without an official key: {sorted(set(ours) - set(targets))[:5]}"
    n_dec = load_config(REPO / config, overrides).model.dec_layers
    for mine, keys in targets.items():
        assert set(ours_to_official_keys(mine, n_dec)) == keys, mine
    # the official parameter count: each tensor once, FrozenBatchNorm statistics excluded
    assert count_parameters(model)["params"] == params


def test_swin_layout_difference_is_mapped():
    assert official_to_ours_key("backbone.0.layers.0.downsample.reduction.weight") == (
        "backbone.body.layers.1.downsample.reduction.weight"
    )
    assert official_to_ours_key("backbone.0.layers.2.blocks.17.mlp.fc1.bias") == (
        "backbone.body.layers.2.blocks.17.mlp.fc1.bias"
    )
    assert official_to_ours_key("backbone.0.norm3.weight") == "backbone.norms.3.weight"
    assert ours_to_official_keys("backbone.body.layers.3.downsample.norm.bias", 6) == [
        "backbone.0.layers.2.downsample.norm.bias"
    ]


def test_relative_position_index_matches_timm():
    timm_swin = pytest.importorskip("timm.models.swin_transformer")
    expected = timm_swin.get_relative_position_index(12, 12)
    assert torch.equal(relative_position_index(12), expected)


def _tiny_official() -> dict:
    return read_official(TINY / "checkpoint.pth")


def test_official_checkpoint_with_namespace_loads_safely():
    ckpt = _tiny_official()
    assert isinstance(ckpt["args"], argparse.Namespace)
    assert ckpt["args"].num_classes == 11


class Foreign:  # any class that is not a tensor, container or argparse.Namespace
    def __init__(self) -> None:
        self.x = 1


def test_foreign_objects_are_refused_unless_flagged(tmp_path):
    ckpt = _tiny_official()
    ckpt["extra"] = Foreign()
    path = tmp_path / "foreign.pth"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="--allow-unsafe-pickle"):
        read_official(path)
    with pytest.raises(CheckpointError, match="--allow-unsafe-pickle"):
        read_weights(path)
    assert main(["official-to-ours", str(path), str(tmp_path / "out.safetensors")]) == 2
    assert not (tmp_path / "out.safetensors").exists()
    # explicitly allowed: loads
    assert isinstance(read_official(path, allow_unsafe_pickle=True)["extra"], Foreign)


def test_unshared_heads_are_refused():
    state = dict(_tiny_official()["model"])
    state["transformer.decoder.class_embed.1.bias"] = state["class_embed.1.bias"] + 1
    with pytest.raises(CheckpointError, match="unshared heads"):
        official_to_ours(state)


def test_round_trip_official_ours_official(tmp_path):
    official = {k: v.float() for k, v in _tiny_official()["model"].items()}
    ours = official_to_ours(official)
    # shared heads stored once
    assert "class_embed.weight" in ours and not any(k.startswith("class_embed.0") for k in ours)
    back = ours_to_official(ours)
    assert set(back) == set(official)
    for k in official:
        assert torch.equal(back[k], official[k]), k
    # through the CLI and files
    ours_file, back_file = tmp_path / "ours.safetensors", tmp_path / "back.pth"
    assert main(["official-to-ours", str(TINY / "checkpoint.pth"), str(ours_file)]) == 0
    assert main(["ours-to-official", str(ours_file), str(back_file)]) == 0
    again = torch.load(back_file, weights_only=True)["model"]
    assert set(again) == set(official)
    for k in official:
        assert torch.equal(again[k].float(), official[k]), k
    # both formats load into the same model
    a = load_model(TINY / "config.yaml", TINY / "checkpoint.pth").state_dict()
    b = load_model(TINY / "config.yaml", ours_file).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_load_model_reports_a_misfit(tmp_path):
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_model(TINY / "config.yaml", TINY / "checkpoint.pth", ["model.num_classes=12"])
    with pytest.raises(CheckpointError, match="not found"):
        load_model(TINY / "config.yaml", tmp_path / "missing.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes((TINY / "checkpoint.pth").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_weights(truncated)
    junk = tmp_path / "junk.pth"
    torch.save({"weights": torch.zeros(1)}, junk)
    with pytest.raises(CheckpointError, match="neither"):
        read_weights(junk)
