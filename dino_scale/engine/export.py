"""Consolidated fp32 weights from a training checkpoint, loadable without DeepSpeed.

ZeRO 1-3 checkpoints hold the fp32 master weights partitioned over ranks; DeepSpeed's
`zero_to_fp32` utilities gather them. A stage-0 checkpoint holds the module state dict
itself. Either way the result is written as one safetensors file in our parameter naming:
tensors shared under several names (DINO's per-layer class/box heads) are stored once and
the other names recorded in the metadata (`aliases`), together with the category list
the model was trained on (`categories`), so fine-tuning can match classes by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dino_scale.io import atomic_write_bytes
from dino_scale.log import get_logger

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
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        module = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_root), tag=tag)
    return {
        name: (t.float() if t.is_floating_point() else t).detach().cpu() for name, t in module.items()
    }


def dedupe_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep one name per storage; returns (tensors, {alias: kept_name})."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_key: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() > 0 and key in by_key:
            aliases[name] = by_key[key]
            continue
        by_key[key] = name
        kept[name] = tensor
    return kept, aliases


def save_weights(state: dict[str, torch.Tensor], path: str | Path,
                 metadata: dict[str, Any] | None = None) -> None:
    """Write `state` as safetensors atomically; `metadata` values are JSON-encoded."""
    from safetensors.torch import save

    tensors, aliases = dedupe_shared(state)
    meta = {"format": "dino-scale", "aliases": json.dumps(aliases)}
    for key, value in (metadata or {}).items():
        meta[key] = json.dumps(value)
    blob = save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)
    atomic_write_bytes(path, blob)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON-decoded metadata of a safetensors file written by `save_weights`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            meta[key] = value
    return meta


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of `save_weights`: the full state dict (aliases restored) and the metadata."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    meta = read_metadata(path)
    for alias, name in (meta.get("aliases") or {}).items():
        state[alias] = state[name]
    return state, meta


def export_checkpoint(ckpt_root: str | Path, tag: str, zero_stage: int, out_path: str | Path,
                      metadata: dict[str, Any] | None = None) -> Path:
    """Consolidate checkpoint `tag` and write it to `out_path` (safetensors)."""
    state = consolidated_state_dict(ckpt_root, tag, zero_stage)
    save_weights(state, out_path, metadata)
    log.info("exported %d tensors of %s/%s to %s", len(state), ckpt_root, tag, out_path)
    return Path(out_path)
