"""Consolidated fp32 weights of a DeepSpeed training checkpoint.

ZeRO 1-3 checkpoints hold the fp32 master weights partitioned over ranks; DeepSpeed's
`zero_to_fp32` utilities gather them. A stage-0 checkpoint holds the module state dict
itself. Either way the result is written as one of our safetensors files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from dino_scale.log import get_logger
from dino_scale.weights.safetensors import save_weights

log = get_logger(__name__)


def consolidated_state_dict(ckpt_root: str | Path, tag: str, zero_stage: int) -> dict[str, torch.Tensor]:
    """fp32 state dict (parameters and buffers) of checkpoint `tag` under `ckpt_root`."""
    ckpt_root = Path(ckpt_root)
    if zero_stage == 0:
        files = sorted((ckpt_root / tag).glob("mp_rank_*_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"no mp_rank_*_model_states.pt in {ckpt_root / tag}")
        # DeepSpeed's file pickles plain Python objects besides tensors
        state = torch.load(files[0], map_location="cpu", weights_only=False)
        module = state["module"]
    else:
        module = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_root), tag=tag)
    return {
        name: (t.float() if t.is_floating_point() else t).detach().cpu() for name, t in module.items()
    }


def export_checkpoint(ckpt_root: str | Path, tag: str, zero_stage: int, out_path: str | Path,
                      metadata: dict[str, Any] | None = None) -> Path:
    """Consolidate checkpoint `tag` and write it to `out_path` (safetensors)."""
    state = consolidated_state_dict(ckpt_root, tag, zero_stage)
    save_weights(state, out_path, metadata)
    log.info("exported %d tensors of %s/%s to %s", len(state), ckpt_root, tag, out_path)
    return Path(out_path)
