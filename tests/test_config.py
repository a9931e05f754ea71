from pathlib import Path

import pytest

from dino_scale.config import Config, ConfigError, dump_config, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", [p for p in CONFIGS], ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_swinl_pretrain_and_finetune_share_one_model_section():
    pre = load_config(REPO / "configs/pretrain_o365_swinl.yaml")
    fin = load_config(REPO / "configs/finetune_coco_swinl.yaml")
    assert pre.model.backbone == fin.model.backbone
    assert pre.model.backbone.name == "swin_large_patch4_window12_384"
    assert pre.model.num_classes == 366 and fin.model.num_classes == 91
    a, b = vars(pre.model).copy(), vars(fin.model).copy()
    a.pop("num_classes"), b.pop("num_classes")
    assert a == b


def test_overrides_apply_with_types(tmp_path):
    cfg = load_config(
        REPO / "configs/dino_r50_4scale_coco.yaml",
        ["optim.lr=2e-4", "model.backbone.name=resnet18", "deepspeed.zero_stage=3",
         "data.train_scales=[320,352]", "train.pretrained=null"],
    )
    assert cfg.optim.lr == 2e-4
    assert cfg.model.backbone.name == "resnet18"
    assert cfg.deepspeed.zero_stage == 3
    assert cfg.data.train_scales == [320, 352]
    assert cfg.train.pretrained is None


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hiden_dim: 128\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    msg = str(err.value)
    assert "model.hiden_dim" in msg and str(bad) in msg


def test_wrong_type_names_key_and_file(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("optim:\n  epochs: twelve\n")
    child = tmp_path / "child.yaml"
    child.write_text("_base_: base.yaml\nmodel:\n  hidden_dim: 128\n")
    with pytest.raises(ConfigError) as err:
        load_config(child)
    msg = str(err.value)
    assert "optim.epochs" in msg and str(base) in msg and "integer" in msg


def test_bad_override_names_command_line():
    with pytest.raises(ConfigError, match=r"deepspeed.zero_stage.*command line"):
        load_config(None, ["deepspeed.zero_stage=4"])
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'.*command line"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match=r"model.backbone.*must be a mapping"):
        load_config(None, ["model.backbone=resnet50"])


def test_bool_is_not_an_integer_and_int_is_a_float():
    with pytest.raises(ConfigError, match="model.hidden_dim"):
        load_config(None, ["model.hidden_dim=true"])
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0


def test_missing_base_and_cycles(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("_base_: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(a)
    b = tmp_path / "b.yaml"
    c = tmp_path / "c.yaml"
    b.write_text("_base_: c.yaml\n")
    c.write_text("_base_: b.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(b)


def test_dump_round_trip(tmp_path):
    cfg = load_config(REPO / "configs/pretrain_o365_swinl.yaml", ["optim.lr=3e-4"])
    out = tmp_path / "resolved.yaml"
    dump_config(cfg, out)
    assert load_config(out) == cfg
