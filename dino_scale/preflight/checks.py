"""The checks themselves: data (shards + manifest, COCO folders, categories vs
`model.num_classes`), weights vs the model's shapes, the resume checkpoint, the output
directory's room, the DeepSpeed settings vs the world size and the hardware."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dino_scale.config import Config, config_to_dict
from dino_scale.data.categories import read_categories
from dino_scale.data.manifest import MANIFEST_NAME, read_manifest, shard_root
from dino_scale.engine.checkpoint import (
    CONFIG_FILE,
    IncompatibleCheckpointError,
    check_compatible,
    latest_complete,
    read_complete_marker,
)
from dino_scale.engine.ds_config import build_deepspeed_config, global_batch, global_batch_change_refusal
from dino_scale.hardware import cpu_features_line, cpu_has_native_bf16
from dino_scale.models import build_dino
from dino_scale.preflight.locations import Locations
from dino_scale.preflight.report import Report
from dino_scale.weights import CheckpointError, read_weight_shapes
from dino_scale.weights.transfer import is_class_param

# Bytes a training checkpoint takes per parameter: fp32 master weights (4) + Adam's two
# moments (8) + the module weights (4 in fp32; 2 in bf16, rounded up) = 16.
CHECKPOINT_BYTES_PER_PARAM = 16
# COCO JSONs above this size are not parsed for their categories (budget: seconds)
MAX_PARSED_ANNOTATIONS_BYTES = 256 << 20


def meta_model(cfg: Config) -> nn.Module:
    """The model with shapes but no storage (device "meta"): names, shapes, parameter count."""
    model_cfg = cfg.model
    saved = model_cfg.backbone.pretrained_path
    model_cfg.backbone.pretrained_path = None
    try:
        with torch.device("meta"):
            return build_dino(model_cfg)
    finally:
        model_cfg.backbone.pretrained_path = saved


# ---------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------


def check_train_data(cfg: Config, report: Report, where: Locations, world_size: int) -> None:
    data = cfg.data
    if data.train_shards:
        check_shards(cfg, report, where, world_size)
    elif data.train_coco_images or data.train_coco_annotations:
        if not (data.train_coco_images and data.train_coco_annotations):
            report.fail("data.train_coco_*", "set both data.train_coco_images and data.train_coco_annotations")
            return
        where.readable(data.train_coco_images, "dir", "data.train_coco_images", "images")
        if where.readable(data.train_coco_annotations, "file", "data.train_coco_annotations", "annotations"):
            check_coco_categories(cfg, report, data.train_coco_annotations, "data.train_coco_annotations")
    else:
        report.fail("data", "no training data: set data.train_shards (shards) or "
                            "data.train_coco_images + data.train_coco_annotations")


def check_shards(cfg: Config, report: Report, where: Locations, world_size: int) -> None:
    url = str(cfg.data.train_shards)
    key = "data.train_shards"
    root = shard_root(url)
    if not where.readable(root, "dir", key, "shard directory"):
        return
    try:
        manifest = read_manifest(url, cfg.data.storage_options)
    except FileNotFoundError as exc:
        report.fail(f"{key} manifest", str(exc))
        return
    except (ValueError, OSError) as exc:  # not JSON / not ours / unreadable
        report.fail(f"{key} manifest", f"{root}/{MANIFEST_NAME} is not a readable shard manifest ({exc}); "
                                       "rebuild it with python -m data_pipeline.build_shards")
        return
    shards = manifest["shards"]
    present = where.listing(root)
    missing = [s["name"] for s in shards if s["name"] not in present]
    wrong_size = [s["name"] for s in shards if s["name"] in present and present[s["name"]] != int(s["bytes"])]
    if wrong_size:  # damaged shards are read, their bad samples skipped and counted (not a reason to stop)
        listed = ", ".join(wrong_size[:3]) + (" ..." if len(wrong_size) > 3 else "")
        report.warn(f"{key} shard sizes", f"{len(wrong_size)} of {len(shards)} shards differ in size from the "
                                          f"manifest ({listed}): their bad samples will be skipped and counted; "
                                          "rebuild them with python -m data_pipeline.build_shards to get them back")
    if missing:
        report.fail(f"{key} shards", f"{len(shards)} shards in the manifest, {len(missing)} missing "
                                     f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}): "
                                     "re-run python -m data_pipeline.build_shards with the same arguments")
    else:
        total = int(manifest.get("totals", {}).get("samples", sum(int(s["samples"]) for s in shards)))
        report.ok(f"{key} shards", f"{len(shards)} shards, {total} samples"
                                   + ("" if wrong_size else ", sizes as in the manifest"))
        needed = world_size * cfg.deepspeed.micro_batch_per_gpu
        if cfg.data.mode == "finite" and total < needed:
            report.fail(f"{key} samples", f"{total} samples cannot fill one batch on each of {world_size} ranks "
                                          f"(deepspeed.micro_batch_per_gpu={cfg.deepspeed.micro_batch_per_gpu})")
    check_category_ids(cfg, report, manifest.get("categories") or [], f"{key} categories")


def check_coco_categories(cfg: Config, report: Report, path: str, key: str) -> None:
    if "://" not in path and os.path.getsize(path) > MAX_PARSED_ANNOTATIONS_BYTES:
        report.skip(f"{key} categories", f"{path} is over {MAX_PARSED_ANNOTATIONS_BYTES >> 20} MiB: not parsed here")
        return
    try:
        categories = read_categories(path)
    except (ValueError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        report.fail(f"{key} categories", f"{path} is not a COCO annotation file ({' '.join(str(exc).split())[:200]})")
        return
    check_category_ids(cfg, report, categories, f"{key} categories")


def check_category_ids(cfg: Config, report: Report, categories: list[dict[str, Any]], name: str) -> None:
    if not categories:
        report.warn(name, "no categories listed: class names unknown")
        return
    top = max(int(c["id"]) for c in categories)
    if top >= cfg.model.num_classes:
        report.fail(name, f"category ids go up to {top} but model.num_classes={cfg.model.num_classes} "
                          f"(labels are category ids): set model.num_classes={top + 1}")
    else:
        report.ok(name, f"{len(categories)} categories, ids <= {top} < model.num_classes={cfg.model.num_classes}")


def check_val_data(cfg: Config, report: Report, where: Locations, required: bool) -> None:
    data = cfg.data
    if not (data.val_images or data.val_annotations):
        if required:
            report.fail("data.val_*", "set data.val_images and data.val_annotations (the COCO folder to evaluate on)")
        else:
            report.skip("data.val_*", "no validation set configured")
        return
    if not (data.val_images and data.val_annotations):
        report.fail("data.val_*", "set both data.val_images and data.val_annotations")
        return
    where.readable(data.val_annotations, "file", "data.val_annotations", "annotations")
    where.readable(data.val_images, "dir", "data.val_images", "images")


# ---------------------------------------------------------------------------------------
# weights and checkpoints
# ---------------------------------------------------------------------------------------


def check_weights(cfg: Config, report: Report, model: nn.Module, path: str, key: str, transfer: bool,
                  allow_unsafe_pickle: bool) -> None:
    """`path` fits `model`: same names and shapes; with `transfer` (fine-tuning) the class
    rows may differ (they are copied by category name)."""
    try:
        shapes, meta = read_weight_shapes(path, allow_unsafe_pickle)
    except CheckpointError as exc:
        report.fail(key, str(exc))
        return
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected) - {k for k in shapes if k.endswith("num_batches_tracked")})
    wrong = [f"{k} {shapes[k]} vs {expected[k]}" for k in sorted(set(expected) & set(shapes))
             if shapes[k] != expected[k] and not is_class_param(k)]  # class rows: below
    if missing or unexpected or wrong:
        parts = [f"{label} {len(items)} ({', '.join(items[:2])}{' ...' if len(items) > 2 else ''})"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                 if items]
        report.fail(key, f"{path} does not fit this config's model: {'; '.join(parts)}; check --config "
                         "(model.backbone.name, model.num_feature_levels, ...) against the checkpoint")
        return
    rows = next((shape[0] for name, shape in shapes.items() if "class_embed" in name and name.endswith("bias")), None)
    want = cfg.model.num_classes
    if rows != want and not transfer:
        report.fail(key, f"{path} has {rows} class rows, the config's model.num_classes={want}: "
                         f"set model.num_classes={rows}")
        return
    detail = f"{path}: {len(shapes)} tensors fit the model; {rows} class rows"
    if rows != want:
        categories = meta.get("categories") or _categories_or_none(cfg.train.pretrained_categories)
        if categories:
            detail += f" -> {want} (rows of shared category names copied)"
        else:
            report.warn(key, detail + f" vs model.num_classes={want} and no category names: class rows start "
                                      "from scratch (pass --pretrained-categories)")
            return
    report.ok(key, detail)


def _categories_or_none(path: str | None) -> list[dict[str, Any]] | None:
    if not path:
        return None
    try:
        return read_categories(path)
    except (OSError, ValueError):
        return None


def check_resume(cfg: Config, report: Report, world_size: int, required: bool) -> bool:
    """The checkpoint a run would resume from; True when there is one."""
    root = Path(cfg.paths.checkpoint_dir or Path(cfg.paths.output_dir) / "checkpoints")
    found = latest_complete(root) if (cfg.train.auto_resume or required) else None
    if found is None:
        if required:
            report.fail("resume", f"no complete checkpoint under {root} to resume from "
                                  "(check paths.output_dir / paths.checkpoint_dir)")
        else:
            report.skip("resume", f"starts fresh (no complete checkpoint under {root})")
        return False
    step, directory = found
    states = sorted(p.name for p in directory.glob("*model_states.pt"))
    if not states:
        report.fail("resume", f"{directory} has no model states file (*model_states.pt): remove it to resume "
                              "from the previous checkpoint")
        return True
    try:
        saved_world = read_complete_marker(directory).get("world_size")
    except (OSError, ValueError) as exc:
        report.fail("resume", f"{directory}/COMPLETE is unreadable ({exc})")
        return True
    try:
        check_compatible(directory, config_to_dict(cfg))
    except IncompatibleCheckpointError as exc:
        report.fail("resume", str(exc))
        return True
    saved_batch = _saved_global_batch(directory, saved_world)
    batch = global_batch(cfg.deepspeed, world_size)
    if saved_batch is not None and saved_batch != batch and not cfg.train.allow_global_batch_change:
        report.fail("resume", f"{directory}: "
                              + global_batch_change_refusal(saved_batch, saved_world, cfg.deepspeed, world_size))
    elif saved_world != world_size:
        report.ok("resume", f"{directory} (step {step}) was written by {saved_world} ranks, this run has "
                            f"{world_size}: weights, optimizer state and data position are re-partitioned")
    else:
        report.ok("resume", f"{directory} (step {step}, {saved_world} ranks)")
    return True


def _saved_global_batch(directory: Path, saved_world: int | None) -> int | None:
    """The global batch of the run that wrote `directory`, from its config.json (None if unknown)."""
    try:
        ds = json.loads((directory / CONFIG_FILE).read_text())["deepspeed"]
        return int(saved_world) * int(ds["micro_batch_per_gpu"]) * int(ds.get("gradient_accumulation_steps", 1))
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------------------
# output and DeepSpeed
# ---------------------------------------------------------------------------------------


def check_output_dir(report: Report, directory: str, key: str, needed_bytes: int, what: str) -> None:
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".preflight-"):
            pass
    except OSError as exc:
        report.fail(key, f"{directory} is not writable ({exc.strerror or exc}): choose another {key}")
        return
    free = shutil.disk_usage(path).free
    if free < needed_bytes:
        report.fail(key, f"{directory}: {_gib(free)} free, {what} needs ~{_gib(needed_bytes)}: free space or "
                         f"choose another {key}")
        return
    report.ok(key, f"{directory} writable, {_gib(free)} free ({what}: ~{_gib(needed_bytes)})")


def check_deepspeed(cfg: Config, report: Report, world_size: int) -> None:
    ds = cfg.deepspeed
    ds_log = logging.getLogger(build_deepspeed_config.__module__)
    level = ds_log.level
    ds_log.setLevel(logging.ERROR)  # its bf16 warning becomes this check's row
    try:
        config = build_deepspeed_config(cfg, world_size)
    except ValueError as exc:
        report.fail("deepspeed", str(exc))
        return
    finally:
        ds_log.setLevel(level)
    expected = global_batch(ds, world_size)
    if config.get("train_batch_size") != expected:
        report.fail("deepspeed", f"deepspeed.extra sets train_batch_size={config.get('train_batch_size')}, but "
                                 f"micro batch {ds.micro_batch_per_gpu} x accumulation "
                                 f"{ds.gradient_accumulation_steps} x {world_size} ranks = {expected}: remove it")
        return
    if ds.precision == "bf16":
        if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            report.fail("deepspeed.precision", f"bf16 on {torch.cuda.get_device_name()}, which has no bf16: "
                                               "set deepspeed.precision=fp16 or fp32")
            return
        if not torch.cuda.is_available() and not cpu_has_native_bf16():
            report.warn("deepspeed.precision", f"bf16 on a CPU without native bf16 ({cpu_features_line()}): "
                                               "~100x slower than fp32; set deepspeed.precision=fp32 here")
            return
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    report.ok("deepspeed", f"ZeRO {ds.zero_stage}, {ds.precision} on {device}, {world_size} ranks x micro batch "
                           f"{ds.micro_batch_per_gpu} x accumulation {ds.gradient_accumulation_steps} = "
                           f"batch {expected}")


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"
