"""Preflight: everything a run will need, checked in seconds before any process group,
model or data loader is built.

`run_preflight(cfg, plan, world_size)` returns a `Report` (one row per check); `require`
turns its failures into a `PreflightError` (one line per problem, exit status 2 through
`dino_scale.errors.run_command`). The launch scripts call it on rank 0 first;
`python -m dino_scale.preflight` runs it alone and prints the table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from dino_scale.config import Config
from dino_scale.preflight.checks import (
    CHECKPOINT_BYTES_PER_PARAM,
    check_deepspeed,
    check_output_dir,
    check_resume,
    check_train_data,
    check_val_data,
    check_weights,
    meta_model,
)
from dino_scale.preflight.locations import Locations
from dino_scale.preflight.report import Check, PreflightError, Report, require


@dataclass
class Plan:
    """What a command will read and write."""

    train: bool = True  # training data, output/checkpoint room, DeepSpeed settings
    require_val: bool = False  # evaluation: data.val_* must be set
    weights: str | None = None  # file loaded into the model
    weights_key: str = "train.pretrained"
    transfer: bool = True  # class rows may differ (fine-tuning) vs strict (evaluate, infer)
    allow_unsafe_pickle: bool = False
    resume: bool = False  # a checkpoint to resume from must exist
    images: list[str] = field(default_factory=list)  # single images read (infer)
    outputs: list[str] = field(default_factory=list)  # files written besides the output dir


def run_preflight(cfg: Config, plan: Plan, world_size: int = 1) -> Report:
    started = time.perf_counter()
    report = Report()
    where = Locations(report, cfg.data.storage_options)
    model = meta_model(cfg)
    params = sum(p.numel() for p in model.parameters())
    report.ok("config", f"{cfg.model.backbone.name} DINO, {params / 1e6:.1f}M parameters, "
                        f"{cfg.model.num_classes} classes")
    if cfg.model.backbone.pretrained_path:
        where.readable(cfg.model.backbone.pretrained_path, "file", "model.backbone.pretrained_path",
                       "backbone weights")
    resuming = False
    if plan.train:
        check_train_data(cfg, report, where, world_size)
        resuming = check_resume(cfg, report, world_size, required=plan.resume)
        check_output_dir(report, cfg.paths.output_dir, "paths.output_dir",
                         params * CHECKPOINT_BYTES_PER_PARAM, f"one checkpoint of {params / 1e6:.1f}M parameters "
                                                              f"at {CHECKPOINT_BYTES_PER_PARAM} B each")
        if cfg.paths.checkpoint_dir:
            check_output_dir(report, cfg.paths.checkpoint_dir, "paths.checkpoint_dir",
                             params * CHECKPOINT_BYTES_PER_PARAM, "one checkpoint")
        check_deepspeed(cfg, report, world_size)
    if plan.train or plan.require_val:
        check_val_data(cfg, report, where, required=plan.require_val)
    if plan.weights:
        if resuming:
            report.skip(plan.weights_key, f"{plan.weights}: not loaded, the run resumes from its checkpoint")
        elif where.readable(plan.weights, "file", plan.weights_key, "weights"):
            check_weights(cfg, report, model, plan.weights, plan.weights_key, plan.transfer,
                          plan.allow_unsafe_pickle or cfg.train.allow_unsafe_pickle)
    if plan.train and cfg.train.pretrained_categories:
        where.readable(cfg.train.pretrained_categories, "file", "train.pretrained_categories", "categories")
    for image in plan.images:
        check_image(report, image)
    for output in plan.outputs:
        check_output_dir(report, str(Path(output).parent), f"output {output}", 0, "a small file")
    report.seconds = time.perf_counter() - started
    return report


def check_image(report: Report, path: str) -> None:
    """Readable and an image format PIL knows (the header only)."""
    try:
        with Image.open(path) as image:
            size = image.size
    except FileNotFoundError:
        report.fail("image", f"{path} does not exist")
        return
    except (UnidentifiedImageError, OSError) as exc:
        report.fail("image", f"{path} is not a readable image ({exc})")
        return
    report.ok("image", f"{path} ({size[0]}x{size[1]})")


__all__ = ["Check", "Plan", "PreflightError", "Report", "require", "run_preflight"]
