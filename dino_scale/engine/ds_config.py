"""The DeepSpeed JSON config generated from our `deepspeed` config section."""

from __future__ import annotations

from typing import Any

import torch

from dino_scale.config import Config, DeepSpeedConfig, deep_merge
from dino_scale.hardware import cpu_features_line, cpu_has_native_bf16
from dino_scale.log import get_logger

log = get_logger(__name__)


def build_deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """DeepSpeed config for `world_size` data-parallel ranks.

    The optimizer is a client torch AdamW (see `optim.build_optimizer`), so no "optimizer"
    or "scheduler" block is generated: the trainer owns the schedule. `deepspeed.extra` is
    merged last, key by key.
    """
    ds = cfg.deepspeed
    if ds.precision == "fp16" and not torch.cuda.is_available():
        raise ValueError(
            "deepspeed.precision=fp16 needs a CUDA device (DeepSpeed refuses fp16 on CPU); "
            "use bf16 or fp32"
        )
    if ds.precision == "bf16" and not torch.cuda.is_available() and not cpu_has_native_bf16():
        log.warning(
            "deepspeed.precision=bf16 on a CPU without native bf16 (%s): bf16 matrix products are "
            "emulated, ~100x slower than fp32 here; set deepspeed.precision=fp32 on this machine",
            cpu_features_line(),
        )
    micro = ds.micro_batch_per_gpu
    accum = ds.gradient_accumulation_steps
    if micro < 1 or accum < 1:
        raise ValueError("deepspeed.micro_batch_per_gpu and gradient_accumulation_steps must be >= 1")
    config: dict[str, Any] = {
        "train_batch_size": global_batch(ds, world_size),
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": ds.gradient_clipping,
        "steps_per_print": ds.steps_per_print,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
    }
    if ds.zero_stage in (1, 2):
        config["zero_optimization"].update(
            {"contiguous_gradients": True, "overlap_comm": False, "reduce_scatter": True}
        )
    if ds.zero_stage == 3:
        config["zero_optimization"].update(
            {"stage3_gather_16bit_weights_on_model_save": False, "overlap_comm": False}
        )
    deep_merge(config, ds.extra)
    return config


def global_batch(ds: DeepSpeedConfig, world_size: int) -> int:
    """Images per optimizer step: micro-batch x accumulation x ranks."""
    return ds.micro_batch_per_gpu * ds.gradient_accumulation_steps * world_size


def global_batch_change_refusal(saved: int, saved_world: int, ds: DeepSpeedConfig, world_size: int) -> str:
    """Why a resume from a run of global batch `saved` (on `saved_world` ranks) is refused,
    naming the setting that keeps the saved batch on `world_size` ranks."""
    per_rank = saved / (world_size * ds.micro_batch_per_gpu)
    hint = (f"deepspeed.gradient_accumulation_steps={int(per_rank)}" if per_rank == int(per_rank)
            else f"deepspeed.micro_batch_per_gpu x gradient_accumulation_steps = {saved / world_size:g}")
    return (f"the checkpoint was trained with a global batch of {saved} ({saved_world} ranks); this run's is "
            f"{global_batch(ds, world_size)} ({world_size} ranks x {ds.micro_batch_per_gpu} x "
            f"{ds.gradient_accumulation_steps} accumulation): keep it with {hint}, or set "
            "train.allow_global_batch_change=true (the schedule then follows samples)")
