"""Transfer pretrained DINO weights to a model with a different label set.

Class-dependent tensors are those whose rows are indexed by class (category id): the
decoder class heads (`class_embed.*`, shared with `transformer.decoder.class_embed.*`),
the encoder-proposal class head (`transformer.enc_out_class_embed`) and the denoising label
embedding (`label_enc`, `num_classes + 1` rows). They start from the new model's own
initialisation; the rows of categories that the pretraining and target datasets share BY
NAME are copied from the pretrained rows (Objects365 contains most COCO classes, under
names that differ only in case/spacing for some). Every other tensor transfers unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dino_scale.data.categories import read_categories
from dino_scale.log import get_logger
from dino_scale.models.state_dict import describe_mismatch
from dino_scale.weights.load import read_weights
from dino_scale.weights.safetensors import is_safetensors, read_metadata

log = get_logger(__name__)

CLASS_PARAM_PATTERNS = ("class_embed", "label_enc")


def normalise_name(name: str) -> str:
    """'Traffic Light' / 'traffic_light' / 'traffic-light' -> 'traffic light'."""
    return re.sub(r"[\s_\-/]+", " ", name.strip().lower())


def is_class_param(name: str) -> bool:
    return any(p in name for p in CLASS_PARAM_PATTERNS)


def class_row_mapping(source: list[dict[str, Any]] | None, target: list[dict[str, Any]] | None,
                      source_rows: int, target_rows: int) -> dict[int, int]:
    """{target row: source row} for categories shared by name."""
    if source is None or target is None:
        if source_rows == target_rows:
            log.warning("category names unknown: same number of classes (%d), class rows kept "
                        "as they are", target_rows)
            return {i: i for i in range(target_rows)}
        log.warning("category names unknown (set train.pretrained_categories): all class rows "
                    "start from scratch")
        return {}
    by_name = {normalise_name(c["name"]): c["id"] for c in source}
    mapping = {}
    for cat in target:
        src = by_name.get(normalise_name(cat["name"]))
        if src is not None and src < source_rows and cat["id"] < target_rows:
            mapping[cat["id"]] = src
    return mapping


def transfer_state_dict(pretrained: Mapping[str, torch.Tensor], model: nn.Module,
                        source_categories: list[dict[str, Any]] | None,
                        target_categories: list[dict[str, Any]] | None,
                        source_num_classes: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict to load into `model`, and a report of what was copied.

    `source_num_classes`: rows of the pretrained class heads (inferred when None).
    """
    target_state = model.state_dict()
    target_num_classes = _num_classes_of(target_state)
    if source_num_classes is None:
        source_num_classes = _num_classes_of(pretrained)
    # official files drop BatchNorm's num_batches_tracked counters: the model keeps its own
    missing = sorted(k for k in set(target_state) - set(pretrained) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(pretrained) - set(target_state))
    if missing or unexpected:
        raise KeyError("pretrained weights do not match the model: "
                       + describe_mismatch(missing, unexpected, shown=3))
    mapping = class_row_mapping(source_categories, target_categories, source_num_classes, target_num_classes)
    out: dict[str, torch.Tensor] = {}
    for name, target in target_state.items():
        if name not in pretrained:
            out[name] = target
            continue
        source = pretrained[name]
        if is_class_param(name):
            out[name] = _transfer_rows(name, source, target, mapping, source_num_classes, target_num_classes)
            continue
        if source.shape != target.shape:
            raise ValueError(f"pretrained {name} has shape {tuple(source.shape)}, the model "
                             f"{tuple(target.shape)}: check the model config")
        out[name] = source.to(target.dtype)
    shared = sorted(normalise_name(c["name"]) for c in (target_categories or [])
                    if c["id"] in mapping) if source_categories else []
    report = {"copied_class_rows": len(mapping), "target_classes": target_num_classes,
              "source_classes": source_num_classes, "shared_names": shared}
    log.info("fine-tune transfer: %d of %d class rows copied from %d pretrained classes",
             len(mapping), target_num_classes, source_num_classes)
    return out, report


def _num_classes_of(state: Mapping[str, torch.Tensor]) -> int:
    for name, tensor in state.items():
        if "class_embed" in name and name.endswith("bias"):
            return int(tensor.shape[0])
    raise KeyError("no class head (…class_embed….bias) in the state dict")


def _transfer_rows(name: str, source: torch.Tensor, target: torch.Tensor, mapping: dict[int, int],
                   source_classes: int, target_classes: int) -> torch.Tensor:
    if source.shape[1:] != target.shape[1:]:
        raise ValueError(f"pretrained {name} has shape {tuple(source.shape)}, the model "
                         f"{tuple(target.shape)}: only the class dimension may differ")
    out = target.clone()
    for dst, src in mapping.items():
        out[dst] = source[src].to(out.dtype)
    # rows past the classes (label_enc's extra entry) correspond positionally
    extra = min(source.shape[0] - source_classes, target.shape[0] - target_classes)
    for k in range(max(extra, 0)):
        out[target_classes + k] = source[source_classes + k].to(out.dtype)
    return out


def read_pretrained(path: str | Path, allow_unsafe_pickle: bool = False
                    ) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]] | None]:
    """(state dict in our naming, categories if the file records them) from our
    safetensors export, a `.pt` state dict, or an official IDEA-Research DINO `.pth`."""
    state = read_weights(path, allow_unsafe_pickle=allow_unsafe_pickle)
    if not is_safetensors(path):
        return state, None
    return state, read_metadata(path).get("categories")


def load_pretrained(model: nn.Module, path: str | Path, *, target_categories: list[dict[str, Any]] | None,
                    pretrained_categories: str | None = None, allow_unsafe_pickle: bool = False,
                    ) -> dict[str, Any]:
    """Load `path` into `model` with class-row transfer; returns the transfer report."""
    state, source_categories = read_pretrained(path, allow_unsafe_pickle)
    if pretrained_categories:
        source_categories = read_categories(pretrained_categories)
    new_state, report = transfer_state_dict(state, model, source_categories, target_categories)
    model.load_state_dict(new_state, strict=True)
    return report
