"""Our weight files: one safetensors file in our parameter naming, loadable without
DeepSpeed. Tensors shared under several names (DINO's per-layer class/box heads) are stored
once and the other names recorded in the metadata (`aliases`), together with whatever the
writer adds (the trainer records the category list, so fine-tuning can match classes by
name)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from dino_scale.io import atomic_write_bytes


def is_safetensors(path: str | Path) -> bool:
    """By content: an 8-byte little-endian header length, then a JSON object."""
    with open(path, "rb") as f:
        head = f.read(16)
    return len(head) > 9 and head[8:9] == b"{"


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
    tensors, aliases = dedupe_shared(state)
    meta = {"format": "dino-scale", "aliases": json.dumps(aliases)}
    for key, value in (metadata or {}).items():
        meta[key] = json.dumps(value)
    blob = save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)
    atomic_write_bytes(path, blob)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON-decoded metadata of a safetensors file written by `save_weights`."""
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            meta[key] = value
    return meta


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors stored in a safetensors file (its header only)."""
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of `save_weights`: the full state dict (aliases restored) and the metadata."""
    state = load_file(str(path))
    meta = read_metadata(path)
    for alias, name in (meta.get("aliases") or {}).items():
        state[alias] = state[name]
    return state, meta
