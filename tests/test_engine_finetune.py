"""Fine-tune transfer on the real DINO: class rows copied by category name, from our
export and from an official-format checkpoint made with the converter."""

from __future__ import annotations

import json

import pytest
import torch

from dino_scale.config import load_config
from dino_scale.data.categories import read_categories
from dino_scale.models import build_dino
from dino_scale.weights import ours_to_official, save_weights
from dino_scale.weights.transfer import load_pretrained, normalise_name

SOURCE = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "Traffic Light"},
          {"id": 4, "name": "star"}]
TARGET = [{"id": 1, "name": "star"}, {"id": 2, "name": "traffic_light"}, {"id": 3, "name": "pentagon"}]
CLASS_KEYS = ("class_embed.weight", "class_embed.bias", "transformer.enc_out_class_embed.weight",
              "transformer.enc_out_class_embed.bias", "label_enc.weight")


def _model(num_classes: int, seed: int):
    cfg = load_config("configs/demo/model_small.yaml", [f"model.num_classes={num_classes}"])
    torch.manual_seed(seed)
    return build_dino(cfg.model)


@pytest.fixture(scope="module")
def pretrained():
    return _model(5, seed=1)


def _check_transfer(source_model, target_model, fresh_state):
    src, dst = source_model.state_dict(), target_model.state_dict()
    for key in CLASS_KEYS:
        # target id 1 'star' <- source id 4; id 2 'traffic_light' <- 'Traffic Light' (3)
        assert torch.equal(dst[key][1], src[key][4]), key
        assert torch.equal(dst[key][2], src[key][3]), key
        # 'pentagon' and the background row 0 keep the fresh initialisation
        assert torch.equal(dst[key][3], fresh_state[key][3]), key
        assert torch.equal(dst[key][0], fresh_state[key][0]), key
    assert torch.equal(dst["label_enc.weight"][4], src["label_enc.weight"][5])  # extra dn row
    for key, value in dst.items():
        if not any(key.startswith(k.rsplit(".", 1)[0]) for k in CLASS_KEYS) and value.is_floating_point():
            assert torch.equal(value, src[key]), key


def test_from_our_export_uses_the_recorded_categories(pretrained, tmp_path):
    path = tmp_path / "model.safetensors"
    save_weights(pretrained.state_dict(), path, {"categories": SOURCE})
    target = _model(4, seed=2)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    report = load_pretrained(target, path, target_categories=TARGET)
    assert report["copied_class_rows"] == 2
    _check_transfer(pretrained, target, fresh)


def test_from_an_official_checkpoint_with_categories_file(pretrained, tmp_path):
    official = tmp_path / "checkpoint0011.pth"
    import argparse

    torch.save({"model": ours_to_official(pretrained.state_dict()), "epoch": 11,
                "args": argparse.Namespace(num_classes=5)}, official)
    cats = tmp_path / "o365.json"
    cats.write_text(json.dumps({"categories": SOURCE}))
    target = _model(4, seed=3)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    report = load_pretrained(target, official, target_categories=TARGET, pretrained_categories=str(cats))
    assert report["copied_class_rows"] == 2 and report["source_classes"] == 5
    _check_transfer(pretrained, target, fresh)
    assert read_categories(cats) == SOURCE


def test_mismatched_architecture_is_a_clear_error(pretrained, tmp_path):
    path = tmp_path / "model.safetensors"
    save_weights(pretrained.state_dict(), path, {"categories": SOURCE})
    cfg = load_config("configs/demo/model_small.yaml", ["model.num_classes=4", "model.hidden_dim=32",
                                                        "model.num_heads=4"])
    with pytest.raises((ValueError, KeyError), match="shape"):
        load_pretrained(build_dino(cfg.model), path, target_categories=TARGET)


def test_names_match_across_spelling():
    assert normalise_name("Traffic Light") == normalise_name("traffic_light") == "traffic light"
