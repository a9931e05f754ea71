"""`python -m dino_scale.models.summary CONFIG`: the official parameter counts."""

from __future__ import annotations

from pathlib import Path

from dino_scale.models.summary import main

REPO = Path(__file__).resolve().parents[1]


def test_summary_reports_the_official_r50_count(capsys):
    assert main([str(REPO / "configs/dino_r50_4scale_coco.yaml")]) == 0
    out = capsys.readouterr().out
    assert "46,893,182" in out and "46.9M" in out
    assert "46,670,782" in out  # trainable: frozen stem and layer1 left out


def test_summary_swin_l_per_config(capsys):
    # the official 217.2M is the 91-class COCO model; the O365 config has 366 classes
    assert main([str(REPO / "configs/finetune_coco_swinl.yaml")]) == 0
    assert "217.2M" in capsys.readouterr().out
    assert main([str(REPO / "configs/pretrain_o365_swinl.yaml")]) == 0
    assert "217,441,816" in capsys.readouterr().out


def test_summary_swin_l_5scale_per_config(capsys):
    # counted from the official code: build_dino on config/DINO/DINO_5scale.py with
    # swin_L_384_22k, 91 and 366 classes (dn label book = classes)
    assert main([str(REPO / "configs/finetune_coco_swinl_5scale.yaml")]) == 0
    assert "217,576,690" in capsys.readouterr().out
    assert main([str(REPO / "configs/pretrain_o365_swinl_5scale.yaml")]) == 0
    assert "217,788,440" in capsys.readouterr().out
