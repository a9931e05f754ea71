"""Official IDEA-Research/DINO checkpoints: torch pickles `{'model': state_dict, 'args':
argparse.Namespace, ...}`, read without running pickled code, and their state dicts
converted to and from ours.

The names are remapped by the model families (`dino_scale.models.dino` for the heads and
the backbone prefix, `dino_scale.models.swin` for Swin's PatchMerging); what is left here
is the state dict as a whole: the aliases of a shared head must hold one value, and Swin's
`relative_position_index` is a derived constant that official files store and our model
computes, so it is checked and dropped (regenerated on the way back).
"""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from dino_scale.models.dino import official_to_ours_key, ours_to_official_keys
from dino_scale.models.swin import relative_position_index
from dino_scale.weights.errors import CheckpointError

UNSAFE_FLAG = "--allow-unsafe-pickle"
DERIVED_SUFFIXES = ("relative_position_index",)


def official_to_ours(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official state dict -> ours. Aliases of a shared head must hold equal values (an
    official model trained without head sharing cannot be represented: error); derived
    Swin buffers are checked against their definition and dropped."""
    ours: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for key, tensor in official.items():
        if key.endswith(DERIVED_SUFFIXES):
            window = int(round(tensor.shape[0] ** 0.5))
            if not torch.equal(tensor.long(), relative_position_index(window)):
                raise CheckpointError(f"{key}: not the standard relative position index of window {window}")
            continue
        if key.endswith("num_batches_tracked"):
            continue
        name = official_to_ours_key(key)
        if name in ours:
            if ours[name].shape != tensor.shape or not torch.equal(ours[name], tensor):
                raise CheckpointError(
                    f"{key} and {source[name]} are both {name} in this model (shared decoder heads) "
                    "but hold different values: checkpoints with unshared heads are not supported"
                )
            continue
        ours[name] = tensor
        source[name] = key
    return ours


def ours_to_official(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> official names (shared heads under every alias, as one tensor;
    Swin relative position indices regenerated)."""
    layers = {int(m.group(1)) for k in ours if (m := re.match(r"transformer\.decoder\.layers\.(\d+)\.", k))}
    num_decoder_layers = max(layers) + 1 if layers else 0
    official: dict[str, torch.Tensor] = {}
    for key, tensor in ours.items():
        for name in ours_to_official_keys(key, num_decoder_layers):
            official[name] = tensor
        if key.endswith("attn.relative_position_bias_table"):
            window = (int(round(tensor.shape[0] ** 0.5)) + 1) // 2
            prefix = ours_to_official_keys(key, num_decoder_layers)[0][: -len("relative_position_bias_table")]
            official[prefix + "relative_position_index"] = relative_position_index(window)
    return official


def read_official(path: str | Path, allow_unsafe_pickle: bool = False, mmap: bool = False) -> dict[str, Any]:
    """Load an official `.pth` without running arbitrary pickled code.

    Tensors, containers and `argparse.Namespace` (the official 'args') are allowed; any other
    object is refused unless `allow_unsafe_pickle` (CLI `--allow-unsafe-pickle`). `mmap`
    maps the tensors' storage instead of reading it (only what is touched is read).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if allow_unsafe_pickle:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, ValueError) as exc:  # truncated or not a torch file (mmap: ValueError)
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint: {exc}") from exc
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} holds Python objects beyond tensors and argparse.Namespace, which could run "
            f"code when loaded; if you trust the file pass {UNSAFE_FLAG} "
            f"(config: train.allow_unsafe_pickle=true). Details: {str(exc).splitlines()[0]}"
        ) from exc


def is_official(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("model"), dict) and any(
        k.startswith(("transformer.", "backbone.0.")) for k in obj["model"]
    )
