"""Training checkpoints: DeepSpeed directories plus what DeepSpeed leaves out.

Layout under the checkpoint root (default `<output_dir>/checkpoints`):

    step_<N>/                      DeepSpeed's own files for tag `step_<N>` (model, optimizer
                                   partitions; `client_state`: step, epoch, config, trainer state)
    step_<N>/rank_state/rank<r>.pt per-rank RNG states (python, numpy, torch, cuda) and the
                                   data-loader position: DeepSpeed keeps one client_state only
    step_<N>/config.json           the resolved config (checked before a resume loads anything)
    step_<N>/COMPLETE              written by rank 0 after every rank has finished, last
                                   (step, world size, ZeRO stage)
    step_<N>/universal/            DeepSpeed's universal form of the same checkpoint (per
                                   parameter: fp32 weights, Adam exp_avg/exp_avg_sq, step),
                                   made on the first resume by another number of ranks

Only directories with COMPLETE are ever resumed from, so a run killed half-way through a
save resumes from the previous checkpoint. A resume on another number of ranks converts the
ZeRO checkpoint to the universal form once (rank 0, into `universal.partial/`, renamed when
complete, with its own COMPLETE marker; the others wait at a barrier) and loads weights and
optimizer state re-partitioned from it, so nothing but the layout changes. The last `keep_last` complete checkpoints are
kept; older ones (and incomplete ones older than the newest complete) are removed.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from deepspeed.checkpoint import ds_to_universal
from deepspeed.checkpoint.constants import (
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from dino_scale.engine import distributed as dist_utils
from dino_scale.errors import UserError
from dino_scale.io import atomic_write_text, atomic_write_with
from dino_scale.log import get_logger

log = get_logger(__name__)

COMPLETE_MARKER = "COMPLETE"
UNIVERSAL_DIR = "universal"
_TORCH_LOAD = torch.load
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
            return _TORCH_LOAD(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it holds pickled objects other than tensors and DeepSpeed's "
            f"training state, which could run code ({_unpickler_reason(exc)})"
        ) from None


@contextmanager
def _torch_load_weights_only() -> Iterator[None]:
    """DeepSpeed's universal-checkpoint code calls torch.load(weights_only=False) itself:
    while it runs, every torch.load unpickles tensors and DeepSpeed's plain state only."""

    def safe_load(f: Any, map_location: Any = None, **_: Any) -> Any:
        return _load_weights_only(f, map_location)

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = _TORCH_LOAD


def _unpickler_reason(exc: Exception) -> str:
    lines = str(exc).splitlines()
    return next((line.strip() for line in lines if "WeightsUnpickler error" in line), lines[0] if lines else "")[:300]


class IncompatibleCheckpointError(UserError):
    """The checkpoint was written for another model or training setup; the message says what differs."""


@dataclass
class ResumeSource:
    """The checkpoint a run resumes from and how: `universal` when it was written by another
    number of ranks under ZeRO 1-3 (the engine must be built with `load_universal`)."""

    step: int
    directory: Path
    saved_world: int
    zero_stage: int
    universal: bool


@dataclass
class Restored:
    client_state: dict[str, Any]
    saved_world: int
    # this rank's saved state (same number of ranks), else None (`CheckpointManager.rank_states`
    # reads every rank's)
    rank_state: dict[str, Any] | None


def _saved_zero_stage(directory: Path, marker: dict[str, Any]) -> int:
    if "zero_stage" in marker:
        return int(marker["zero_stage"])
    return 1 if any(directory.glob("*zero_pp_rank_*optim_states.pt")) else 0


CONFIG_FILE = "config.json"
# sections whose every key shapes the parameters or what they mean
_SHAPING_SECTIONS = ("model",)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_compatible(directory: Path, config: dict[str, Any]) -> None:
    """Raise `IncompatibleCheckpointError` naming every model setting that differs between
    the checkpoint in `directory` and `config` (checkpoints without config.json pass)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    saved_flat = {k: v for s in _SHAPING_SECTIONS for k, v in _flatten(saved.get(s, {}), f"{s}.").items()}
    now_flat = {k: v for s in _SHAPING_SECTIONS for k, v in _flatten(config.get(s, {}), f"{s}.").items()}
    ignored = ("model.backbone.pretrained_path", "model.msda_impl")  # where weights came from, which kernel runs
    diff = {k: (saved_flat.get(k), now_flat.get(k)) for k in sorted(set(saved_flat) | set(now_flat))
            if saved_flat.get(k) != now_flat.get(k) and k not in ignored}
    if diff:
        listed = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, a, b in ((k, *v) for k, v in diff.items()))
        raise IncompatibleCheckpointError(
            f"checkpoint {directory} was written for another model ({listed}); resume with its settings, "
            f"or start in another paths.output_dir / paths.checkpoint_dir")


def _repair_zero3_universal_load(optimizer: torch.optim.Optimizer, hyperparameters: list[dict[str, Any]]) -> None:
    """Undo two things DeepSpeed's ZeRO-3 universal loader
    (`load_hp_checkpoint_state_from_checkpoint_dir_stage3`) does to the optimizer:
    - it gives every param group the hyperparameters of the first (the backbone's lower LR and
      its name went to every group): `hyperparameters`, taken before the load, go back;
    - it stores one `step` tensor object in every parameter's Adam state; torch increments it
      in place once per sub-group step, so the second and third groups' bias corrections ran
      ahead (the losses drifted 0.2-3% from the uninterrupted run's). Each gets its own copy.
    Both are no-ops after the other stages' loads."""
    for group, saved in zip(optimizer.param_groups, hyperparameters):
        group.update(saved)
    for state in optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def convert_to_universal(directory: Path) -> Path:
    """DeepSpeed's universal form of ZeRO checkpoint `directory` in `directory/universal`
    (made once; atomic: built in `universal.partial/`, renamed when complete)."""
    target = directory / UNIVERSAL_DIR
    if (target / COMPLETE_MARKER).is_file():
        return target
    partial = directory / f"{UNIVERSAL_DIR}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    args = SimpleNamespace(input_folder=str(directory), output_folder=str(partial), num_extract_workers=1,
                           num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    started = time.perf_counter()
    with _torch_load_weights_only(), redirect_stdout(_LogWriter()):
        ds_to_universal.main(args)
    atomic_write_text(partial / COMPLETE_MARKER, json.dumps({"source": directory.name, "time": time.time()}))
    partial.rename(target)
    log.info("converted %s to DeepSpeed's universal form in %.1f s", directory, time.perf_counter() - started)
    return target


class _LogWriter:
    """ds_to_universal prints its progress: into the debug log instead of stdout."""

    def write(self, text: str) -> int:
        if text.strip():
            log.debug("ds_to_universal: %s", text.strip())
        return len(text)

    def flush(self) -> None:
        pass


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
        client_state = {**client_state, UNIVERSAL_CHECKPOINT_INFO: {
            UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state)
        rank_file = directory / "rank_state" / f"rank{dist_utils.rank()}.pt"
        atomic_write_with(rank_file, lambda f: torch.save(rank_state, f))
        dist_utils.barrier()
        if dist_utils.rank() == 0:
            atomic_write_text(directory / CONFIG_FILE, json.dumps(client_state.get("config", {}), indent=1))
            marker = {"step": step, "world_size": dist_utils.world_size(),
                      "zero_stage": int(engine.zero_optimization_stage()), "time": time.time()}
            atomic_write_text(directory / COMPLETE_MARKER, json.dumps(marker))
            self._prune()
        dist_utils.barrier()
        return directory

    def resume_source(self) -> ResumeSource | None:
        """The newest complete checkpoint and whether it needs the universal path here."""
        found = latest_complete(self.root)
        if found is None:
            return None
        step, directory = found
        marker = read_complete_marker(directory)
        saved_world = int(marker.get("world_size", dist_utils.world_size()))
        stage = _saved_zero_stage(directory, marker)
        universal = saved_world != dist_utils.world_size() and stage > 0
        return ResumeSource(step, directory, saved_world, stage, universal)

    def load(self, engine: Any, source: ResumeSource) -> Restored:
        """Restore `engine` (built with `load_universal` when `source.universal`) from
        `source`: weights, optimizer state and client state whatever the number of ranks."""
        directory, world = source.directory, dist_utils.world_size()
        engine.checkpoint_engine.load = _load_weights_only  # DeepSpeed's own unpickles anything
        if source.saved_world != world:
            log.info("resuming %s written by %d ranks on %d ranks (ZeRO-%d%s)", directory, source.saved_world,
                     world, source.zero_stage, ": weights and optimizer state re-partitioned through "
                     "DeepSpeed's universal checkpoint" if source.universal else "")
        if source.universal:
            if dist_utils.rank() == 0:
                convert_to_universal(directory)
            dist_utils.barrier()
            optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch optimizer
            hyperparameters = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            with _torch_load_weights_only():
                _, client_state = engine.load_checkpoint(
                    str(directory), tag=UNIVERSAL_DIR, load_optimizer_states=True, load_lr_scheduler_states=False)
            _repair_zero3_universal_load(optimizer, hyperparameters)
        else:
            _, client_state = engine.load_checkpoint(
                str(self.root), tag=directory.name, load_optimizer_states=True, load_lr_scheduler_states=False)
        if client_state is None:
            raise IncompatibleCheckpointError(f"DeepSpeed found no checkpoint to load in {directory}")
        own = None
        if source.saved_world == world:
            rank_file = directory / "rank_state" / f"rank{dist_utils.rank()}.pt"
            own = torch.load(rank_file, map_location="cpu", weights_only=True) if rank_file.is_file() else None
        return Restored(client_state, source.saved_world, own)

    def rank_states(self, source: ResumeSource) -> list[dict[str, Any]]:
        """Every saved rank's state (RNG and loader position), in rank order: what a resume in
        another data layout continues from."""
        files = [source.directory / "rank_state" / f"rank{r}.pt" for r in range(source.saved_world)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise IncompatibleCheckpointError(f"{source.directory} lacks the per-rank state of {missing}")
        return [torch.load(f, map_location="cpu", weights_only=True) for f in files]

    def _prune(self) -> None:
        complete = list_checkpoints(self.root)
        for _, old in complete[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        if complete:
            newest = complete[-1][0]
            for step, directory in list_checkpoints(self.root, complete_only=False):
                if step < newest and not (directory / COMPLETE_MARKER).is_file():
                    shutil.rmtree(directory, ignore_errors=True)
