"""`make demo`'s chain end to end at toy size: generated data, Ray shards, 2-rank DeepSpeed
pretraining and fine-tuning, pycocotools evaluation, the report files. (The accuracy goal
is measured by `make demo` itself, see the README.)"""

from __future__ import annotations

import json
import sys

import pytest
from PIL import Image

from launch_helpers import run_ok

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_demo_runs_every_stage_and_writes_its_report(tmp_path):
    out = tmp_path / "demo"
    proc = run_ok([sys.executable, "launch/demo.py", "--output", str(out), "--pretrain-images", "16",
                   "--finetune-images", "16", "--val-images", "6", "--pretrain-epochs", "1",
                   "--finetune-epochs", "1"], timeout=540)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == {"pretrain": 2, "finetune": 2}  # 16 images, 2 ranks x 4 per step
    assert 0.0 <= summary["ap"] <= summary["ap50"] <= 1.0 and summary["val_images"] == 6
    assert set(summary["stage_seconds"]) == {"generate_data", "build_shards", "pretrain", "finetune_and_eval",
                                             "report"}
    assert summary["wall_seconds"] >= sum(summary["stage_seconds"].values())
    assert all(v > 0 for v in summary["images_per_second"].values())
    with Image.open(out / "detections.png") as picture:
        assert picture.size == (3 * 384, 2 * 384)  # 3 x 2 val images of 128 px, drawn 3x
    with Image.open(out / "loss_curve.png") as curve:
        assert curve.width > 0
    assert "AP50" in proc.stdout and (out / "finetune" / "export" / "model.safetensors").is_file()
