"""Weights into a model, whatever the file: our safetensors or an official DINO `.pth`,
told apart by content."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dino_scale.config import load_config
from dino_scale.models import build_dino
from dino_scale.models.state_dict import describe_mismatch, shape_mismatches
from dino_scale.weights.errors import CheckpointError
from dino_scale.weights.official import is_official, official_to_ours, read_official
from dino_scale.weights.safetensors import is_safetensors, load_weights, read_metadata, tensor_shapes


def read_weights(path: str | Path, allow_unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Our state dict from either format, detected by the file's contents."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if is_safetensors(path):
        state, meta = load_weights(path)
        if meta.get("format") not in (None, "dino-scale"):
            raise CheckpointError(f"{path}: safetensors of format {meta.get('format')!r}, not dino-scale")
        return state
    obj = read_official(path, allow_unsafe_pickle)
    if not is_official(obj):
        keys = list(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: neither dino-scale safetensors nor an official DINO checkpoint ({keys})")
    return official_to_ours(obj["model"])


def read_weight_shapes(path: str | Path, allow_unsafe_pickle: bool = False
                       ) -> tuple[dict[str, tuple[int, ...]], dict[str, Any]]:
    """Our parameter names and shapes in either format, and the file's metadata (safetensors:
    what the writer recorded; official: {}), without reading the tensors: the safetensors
    header, or an official `.pth` memory-mapped."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if is_safetensors(path):
        try:
            meta = read_metadata(path)
            shapes = tensor_shapes(path)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own types for bad headers
            raise CheckpointError(f"{path}: unreadable safetensors header: {exc}") from exc
        if meta.get("format") not in (None, "dino-scale"):
            raise CheckpointError(f"{path}: safetensors of format {meta.get('format')!r}, not dino-scale")
        for alias, name in (meta.get("aliases") or {}).items():
            if name in shapes:
                shapes[alias] = shapes[name]
        return shapes, meta
    obj = read_official(path, allow_unsafe_pickle, mmap=True)
    if not is_official(obj):
        keys = list(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: neither dino-scale safetensors nor an official DINO checkpoint ({keys})")
    return {k: tuple(v.shape) for k, v in official_to_ours(obj["model"]).items()}, {}


def load_state_into(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Strict load with an error listing what does not fit (names and shapes)."""
    expected = model.state_dict()
    problems = describe_mismatch(sorted(set(expected) - set(state)), sorted(set(state) - set(expected)),
                                 shape_mismatches(state, expected))
    if problems:
        raise CheckpointError(f"checkpoint does not fit the model: {problems}")
    model.load_state_dict(state, strict=True)


def load_model(config_path: str | Path, checkpoint_path: str | Path, overrides: Sequence[str] = (),
               allow_unsafe_pickle: bool = False) -> torch.nn.Module:
    """Eval-mode DINO built from `config_path` (+ overrides) with the weights of a dino-scale
    safetensors file or an official DINO `.pth`."""
    cfg = load_config(config_path, overrides)
    cfg.model.backbone.pretrained_path = None  # the checkpoint holds the backbone
    model = build_dino(cfg.model)
    state = read_weights(checkpoint_path, allow_unsafe_pickle or cfg.train.allow_unsafe_pickle)
    load_state_into(model, state)
    return model.eval()
