"""Training checkpoints: DeepSpeed directories plus what DeepSpeed leaves out.

Layout under the checkpoint root (default `<output_dir>/checkpoints`):

    step_<N>/                      DeepSpeed's own files for tag `step_<N>` (model, optimizer
                                   partitions; `client_state`: step, epoch, config, trainer state)
    step_<N>/rank_state/rank<r>.pt per-rank RNG states (python, numpy, torch, cuda) and the
                                   data-loader position: DeepSpeed keeps one client_state only
    step_<N>/COMPLETE              written by rank 0 after every rank has finished, last

Only directories with COMPLETE are ever resumed from, so a run killed half-way through a
save resumes from the previous checkpoint. The last `keep_last` complete checkpoints are
kept; older ones (and incomplete ones older than the newest complete) are removed.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from dino_scale.engine import distributed as dist_utils
from dino_scale.io import atomic_write_text, atomic_write_with
from dino_scale.log import get_logger

log = get_logger(__name__)

COMPLETE_MARKER = "COMPLETE"
_TAG_RE = re.compile(r"^step_(\d+)$")


def tag_for_step(step: int) -> str:
    return f"step_{step}"


# ---------------------------------------------------------------------------------------
# RNG states in a form torch.load(weights_only=True) accepts
# ---------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
         np_state["has_gauss"], np_state["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------
# Finding checkpoints
# ---------------------------------------------------------------------------------------


def list_checkpoints(root: str | Path, complete_only: bool = True) -> list[tuple[int, Path]]:
    """(step, directory) pairs sorted by step."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _TAG_RE.match(child.name)
        if not match or not child.is_dir():
            continue
        if complete_only and not (child / COMPLETE_MARKER).is_file():
            continue
        found.append((int(match.group(1)), child))
    return sorted(found)


def latest_complete(root: str | Path) -> tuple[int, Path] | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def read_complete_marker(ckpt_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(ckpt_dir) / COMPLETE_MARKER).read_text())


# ---------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds pickled objects other than tensors and DeepSpeed's state."""


def _deepspeed_safe_globals() -> list[Any]:
    """The plain classes DeepSpeed pickles into its optimizer-state files (ZeRO 1-3, fp32/bf16)."""
    return [LossScaler, ZeroStageEnum, fragment_address]


def _load_weights_only(path: str, map_location: Any = None) -> Any:
    """DeepSpeed checkpoint-engine `load` with weights_only=True: a tampered checkpoint
    cannot run code on resume."""
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it holds pickled objects other than tensors and DeepSpeed's "
            f"training state, which could run code ({_unpickler_reason(exc)})"
        ) from None


def _unpickler_reason(exc: Exception) -> str:
    lines = str(exc).splitlines()
    return next((line.strip() for line in lines if "WeightsUnpickler error" in line), lines[0] if lines else "")[:300]


class CheckpointManager:
    """Saves and restores DeepSpeed training checkpoints with per-rank state."""

    def __init__(self, root: str | Path, keep_last: int) -> None:
        if keep_last < 1:
            raise ValueError(f"train.keep_last_checkpoints must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last

    def save(self, engine: Any, step: int, client_state: dict[str, Any],
             rank_state: dict[str, Any]) -> Path:
        """Collective: every rank calls it. Returns the checkpoint directory."""
        tag = tag_for_step(step)
        directory = self.root / tag
        if dist_utils.rank() == 0 and directory.exists():
            # a leftover from a run killed while saving this very step
            shutil.rmtree(directory)
        dist_utils.barrier()
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state)
        rank_file = directory / "rank_state" / f"rank{dist_utils.rank()}.pt"
        atomic_write_with(rank_file, lambda f: torch.save(rank_state, f))
        dist_utils.barrier()
        if dist_utils.rank() == 0:
            marker = {"step": step, "world_size": dist_utils.world_size(), "time": time.time()}
            atomic_write_text(directory / COMPLETE_MARKER, json.dumps(marker))
            self._prune()
        dist_utils.barrier()
        return directory

    def load(self, engine: Any, directory: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Restore `engine` from `directory`; returns (client_state, this rank's rank_state).

        A checkpoint written by a different number of ranks restores the module weights
        only (DeepSpeed cannot re-partition ZeRO optimizer states) and no per-rank state.
        """
        marker = read_complete_marker(directory)
        same_world = marker.get("world_size") == dist_utils.world_size()
        if not same_world:
            log.warning(
                "checkpoint %s was written by %s ranks, this run has %d: loading the module "
                "weights only (optimizer state and data position start fresh)",
                directory, marker.get("world_size"), dist_utils.world_size(),
            )
        engine.checkpoint_engine.load = _load_weights_only  # DeepSpeed's own unpickles anything
        _, client_state = engine.load_checkpoint(
            str(self.root), tag=directory.name, load_module_only=not same_world,
            load_optimizer_states=same_world, load_lr_scheduler_states=False,
        )
        rank_state = None
        rank_file = directory / "rank_state" / f"rank{dist_utils.rank()}.pt"
        if same_world and rank_file.is_file():
            rank_state = torch.load(rank_file, map_location="cpu", weights_only=True)
        return client_state or {}, rank_state

    def _prune(self) -> None:
        complete = list_checkpoints(self.root)
        for _, old in complete[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        if complete:
            newest = complete[-1][0]
            for step, directory in list_checkpoints(self.root, complete_only=False):
                if step < newest and not (directory / COMPLETE_MARKER).is_file():
                    shutil.rmtree(directory, ignore_errors=True)
