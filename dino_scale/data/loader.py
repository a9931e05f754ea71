"""The trainer's view of the data: `build_train_loader` and `build_eval_loader`.

`TrainLoader` iterates `Batch`es from the shards named by `DataConfig.train_shards`
(directory / s3:// prefix holding `manifest.json`, or the manifest's path). Its position
(`state_dict()`) is (epoch, batches delivered, and each worker's place in its sample
order); after `load_state_dict` a new loader delivers exactly the batches the old one
would have delivered next: same samples, same order, same augmentation (each sample's
RNG is seeded from (seed, epoch, sample key), so worker scheduling cannot change it).

How the order survives a restart: every batch comes from one worker (DataLoader
`batch_size=None`), workers deliver in round-robin, and each batch carries its worker's
position. On resume each worker replays its shuffle order up to that position (index
arithmetic, no reading) and the workers are rotated so that the first one to deliver is
the one that was next.

Elastic resume (`resume_from_ranks`): given the saved states of *every* rank of a run with
another number of ranks, workers or batch size, the loader works out which global positions
of the epoch those ranks had delivered and continues the epoch over the rest (a *plan*, see
`dino_scale.data.stream`): within the epoch no sample is read twice and none is skipped.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader

from dino_scale.data.coco import CocoDetection, SkippingCocoDetection
from dino_scale.data.collate import Batch, collate
from dino_scale.data.manifest import read_manifest, shard_root
from dino_scale.data.samples import BadSample
from dino_scale.data.shards import BadDataError, ShardStream, WorkerProgress, check_bad_fraction, rank_samples
from dino_scale.data.stream import (
    Ranges,
    emitted_ranges,
    mix_seed,
    plan_length,
    plan_slice,
    rank_range,
    rank_worker_plan,
    subtract_ranges,
)
from dino_scale.data.transforms import build_train_transform
from dino_scale.log import get_logger

log = get_logger("dino_scale.data.loader")

STATE_VERSION = 1


class ResumableLoader(Protocol):
    """What the trainer iterates: `TrainLoader`, `CocoTrainLoader` or a test's stand-in."""

    def __iter__(self) -> Iterator[Batch]: ...

    def set_epoch(self, epoch: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def stats(self) -> dict[str, Any]: ...


class ElasticLoader(ResumableLoader, Protocol):
    """A loader that can also continue an epoch from the states of all ranks of a run with
    another layout (`TrainLoader`, `CocoTrainLoader`)."""

    def resume_from_ranks(self, states: list[dict[str, Any]]) -> None: ...


def _as_plan(raw: Any) -> Ranges | None:
    return None if raw is None else [(int(a), int(b)) for a, b in raw]


def _check_same_order(states: list[dict[str, Any]], now: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Refuse states that describe another sample order (other data, seed or mode)."""
    ranks = [s["check"]["rank"] for s in states]
    if ranks != list(range(len(states))) or any(s["check"]["world_size"] != len(states) for s in states):
        raise ValueError(f"elastic resume needs the loader states of every rank in rank order, got ranks {ranks}")
    if len({s["epoch"] for s in states}) != 1:
        raise ValueError(f"the ranks' loader states are in different epochs: {[s['epoch'] for s in states]}")
    saved = states[0]["check"]
    diff = {k: (saved.get(k), now[k]) for k in keys if saved.get(k) != now[k]}
    if diff:
        raise ValueError(f"the checkpoint's data order was made with other settings (saved, now): {diff}")


class TrainLoader:
    """Iterable of `Batch` for one rank; resumable. See the module docstring.

    - `for batch in loader` runs (the rest of) the current epoch; iterating again after an
      epoch finished moves to the next epoch by itself.
    - `set_epoch(e)`: start epoch e from its beginning; a no-op when e is the current epoch
      (so a resumed run may call it without losing its restored position).
    - `len(loader)`: batches this rank delivers per epoch when no sample is bad. In finite
      mode ranks can differ by one batch (`min_len_across_ranks` gives the smallest).
    - `stats()`: {"samples_read", "samples_skipped", "reasons": {reason: n}, "bad_fraction"}
      for the current epoch up to the last delivered batch.
    """

    def __init__(self, cfg: Any, *, batch_size: int, rank: int, world_size: int, seed: int, epoch: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not cfg.train_shards:
            raise ValueError("data.train_shards is not set")
        self.cfg, self.batch_size, self.rank, self.world_size, self.seed = cfg, batch_size, rank, world_size, seed
        self.num_workers = max(1, cfg.num_workers)
        manifest = read_manifest(cfg.train_shards, cfg.storage_options)
        self.root = shard_root(cfg.train_shards)
        self.shards = [(s["name"], int(s["samples"])) for s in manifest["shards"]]
        self.total_samples = sum(n for _, n in self.shards)
        self.categories = manifest.get("categories", [])
        if cfg.mode == "resampled" and not cfg.samples_per_epoch:
            raise ValueError("data.mode=resampled needs data.samples_per_epoch")
        self.transform = build_train_transform(cfg)
        self._start_epoch(epoch)

    # -- position ------------------------------------------------------------------------
    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.batches = 0
        self.finished = False
        self.last_worker = -1
        self.workers = [WorkerProgress(w) for w in range(self.num_workers)]
        self.plan: Ranges | None = None  # None: the whole epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._start_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        """Plain ints/strings/lists (JSON-safe) for a checkpoint's client state."""
        return {
            "version": STATE_VERSION, "epoch": self.epoch, "batches": self.batches, "finished": self.finished,
            "last_worker": self.last_worker, "workers": [w.as_dict() for w in self.workers],
            "plan": [list(r) for r in self.plan] if self.plan is not None else None, "check": self._check(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        if state["check"] != self._check():
            diff = {k: (v, self._check()[k]) for k, v in state["check"].items() if self._check().get(k) != v}
            raise ValueError(f"loader state was saved with different settings (saved, now): {diff}")
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        self.finished, self.last_worker = bool(state["finished"]), int(state["last_worker"])
        self.workers = [WorkerProgress.from_dict(w) for w in state["workers"]]
        self.plan = _as_plan(state.get("plan"))

    ORDER_KEYS = ("mode", "seed", "samples_per_epoch", "total_samples", "num_shards")

    def resume_from_ranks(self, states: list[dict[str, Any]]) -> None:
        """Continue the epoch that `states` (every rank's `state_dict()`, in rank order, from
        a run with any number of ranks/workers/batch size) describe: finite mode reads
        exactly the samples none of those ranks had delivered; resampled mode draws the
        epoch's remaining sample count from a stream keyed by the global position."""
        _check_same_order(states, self._check(), self.ORDER_KEYS)
        epoch = int(states[0]["epoch"])
        self._start_epoch(epoch)
        if all(s["finished"] for s in states):
            self.finished = True
            return
        if self.cfg.mode == "finite":
            taken: Ranges = []
            for state in states:
                old = state["check"]
                plan = _as_plan(state.get("plan")) or [(0, self.total_samples)]
                for w in state["workers"]:
                    sequence = rank_worker_plan(plan, old["rank"], old["world_size"], int(w["worker"]),
                                                old["num_workers"], old["batch_size"])
                    seed = mix_seed("buffer", self.seed, epoch, old["rank"], int(w["worker"]))
                    taken += emitted_ranges(sequence, old["shuffle_buffer"], seed, int(w["position"]))
            self.plan = subtract_ranges(plan, taken)
        else:
            old = states[0]["check"]
            plan = _as_plan(states[0].get("plan")) or [
                (0, (self.cfg.samples_per_epoch // old["world_size"]) * old["world_size"])]
            consumed = sum(int(w["valid"]) for state in states for w in state["workers"])
            self.plan = [(min(plan[0][0] + consumed, plan[0][1]), plan[0][1])]
        log.info("rank %d: epoch %d continues over %d samples not yet read by the %d ranks before",
                 self.rank, epoch, plan_length(self.plan), len(states))

    def _check(self) -> dict[str, Any]:
        """Settings that define the sample order; a state only restores under the same ones."""
        return {
            "mode": self.cfg.mode, "seed": self.seed, "batch_size": self.batch_size, "rank": self.rank,
            "world_size": self.world_size, "num_workers": self.num_workers, "shuffle_buffer": self.cfg.shuffle_buffer,
            "samples_per_epoch": self.cfg.samples_per_epoch, "total_samples": self.total_samples,
            "num_shards": len(self.shards),
        }

    # -- sizes and stats -----------------------------------------------------------------
    def _len_for_rank(self, rank: int) -> int:
        n = rank_samples(self.cfg.mode, self.total_samples, self.cfg.samples_per_epoch, rank, self.world_size,
                         self.plan)
        return math.ceil(n / self.batch_size)

    def __len__(self) -> int:
        return self._len_for_rank(self.rank)

    @property
    def min_len_across_ranks(self) -> int:
        return min(self._len_for_rank(r) for r in range(self.world_size))

    def stats(self) -> dict[str, Any]:
        reasons: dict[str, int] = {}
        for w in self.workers:
            for reason, n in w.skipped.items():
                reasons[reason] = reasons.get(reason, 0) + n
        read = sum(w.position for w in self.workers)
        skipped = sum(reasons.values())
        return {"samples_read": read, "samples_skipped": skipped, "reasons": reasons,
                "bad_fraction": skipped / read if read else 0.0, "epoch": self.epoch, "batches": self.batches}

    # -- iteration -----------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        if self.finished:
            self._start_epoch(self.epoch + 1)
        dataset = ShardStream(
            root=self.root, shards=self.shards, storage_options=self.cfg.storage_options, mode=self.cfg.mode,
            seed=self.seed, epoch=self.epoch, rank=self.rank, world_size=self.world_size,
            num_workers=self.num_workers, batch_size=self.batch_size,
            samples_per_rank=rank_samples(self.cfg.mode, self.total_samples, self.cfg.samples_per_epoch,
                                          self.rank, self.world_size, self.plan),
            shuffle_buffer=self.cfg.shuffle_buffer, transform=self.transform,
            resume=[WorkerProgress.from_dict(w.as_dict()) for w in self.workers],
            worker_offset=(self.last_worker + 1) % self.num_workers,
            max_bad_fraction=self.cfg.max_bad_fraction,
            min_samples_for_bad_fraction=self.cfg.min_samples_for_bad_fraction, plan=self.plan,
        )
        for batch, progress in _data_loader(dataset, self.cfg, batch_size=None, collate_fn=_as_is):
            self.workers[progress.worker] = progress
            self.last_worker = progress.worker
            self.batches += 1
            stats = self.stats()
            check_bad_fraction(stats["samples_read"], stats["samples_skipped"], self.cfg.max_bad_fraction,
                               self.cfg.min_samples_for_bad_fraction, f"rank {self.rank} loader")
            yield batch
        self.finished = True
        stats = self.stats()
        if stats["samples_skipped"]:
            log.warning("epoch %d: skipped %d of %d samples read: %s", self.epoch, stats["samples_skipped"],
                        stats["samples_read"], stats["reasons"])


def _as_is(item: Any) -> Any:
    return item


def _data_loader(dataset: torch.utils.data.Dataset, cfg: Any, **kwargs: Any) -> DataLoader:
    workers = max(0, cfg.num_workers)
    extra: dict[str, Any] = {}
    if workers > 0:
        extra = {"multiprocessing_context": cfg.multiprocessing_context, "prefetch_factor": cfg.prefetch_factor}
    # Each iterator draws the workers' base seed from this generator. From the global RNG
    # (the default) it would shift the trainer's random stream (denoising noise, dropout) by
    # one draw per iterator, so a run resumed mid-epoch would diverge from an uninterrupted
    # one. Augmentation is seeded per sample; the base seed only has to be fixed.
    generator = torch.Generator().manual_seed(0)
    return DataLoader(dataset, num_workers=workers, pin_memory=cfg.pin_memory, generator=generator, **extra, **kwargs)


class CocoTrainLoader:
    """Training over a COCO folder (`cfg.train_coco_images` + `cfg.train_coco_annotations`)
    for small fine-tunes without shards; the same interface as `TrainLoader`.

    Finite epochs only: the images are permuted with (seed, epoch), rank r takes the
    contiguous slice [N*r/R, N*(r+1)/R) in batches; the position is the number of batches
    delivered, so a resumed loader continues with exactly the next batch (augmentation is
    seeded from (seed, epoch, image id)). Crowd boxes are removed from the targets.
    """

    def __init__(self, cfg: Any, *, batch_size: int, rank: int, world_size: int, seed: int, epoch: int = 0) -> None:
        if not 0 <= rank < world_size or batch_size < 1:
            raise ValueError(f"bad rank/world_size/batch_size: {rank}/{world_size}/{batch_size}")
        if cfg.mode != "finite":
            raise ValueError("a COCO-folder train source supports data.mode=finite only; "
                             "build shards for resampled mode")
        self.cfg, self.batch_size, self.rank, self.world_size, self.seed = cfg, batch_size, rank, world_size, seed
        self.coco_dataset = CocoDetection(cfg.train_coco_images, cfg.train_coco_annotations, build_train_transform(cfg),
                                          cfg.storage_options, drop_crowd=True, seed=seed)
        self.dataset = SkippingCocoDetection(self.coco_dataset)
        self._start_epoch(epoch)

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.batches, self.finished = epoch, 0, False
        self.read, self.reasons = 0, {}
        self.plan: Ranges | None = None  # positions of the epoch's permutation still to read

    def _plan(self) -> Ranges:
        return self.plan if self.plan is not None else [(0, len(self.dataset))]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._start_epoch(epoch)

    def _rank_batches(self) -> list[list[int]]:
        order = list(range(len(self.dataset)))
        random.Random(mix_seed("coco", self.seed, self.epoch)).shuffle(order)
        plan = self._plan()
        start, stop = rank_range(plan_length(plan), self.rank, self.world_size)
        mine = [order[i] for a, b in plan_slice(plan, start, stop) for i in range(a, b)]
        return [mine[i : i + self.batch_size] for i in range(0, len(mine), self.batch_size)]

    def __len__(self) -> int:
        start, stop = rank_range(plan_length(self._plan()), self.rank, self.world_size)
        return math.ceil((stop - start) / self.batch_size)

    @property
    def min_len_across_ranks(self) -> int:
        n = plan_length(self._plan())
        ranges = (rank_range(n, k, self.world_size) for k in range(self.world_size))
        return min(math.ceil((s - r) / self.batch_size) for r, s in ranges)

    def _check(self) -> dict[str, Any]:
        return {"source": "coco", "seed": self.seed, "batch_size": self.batch_size, "rank": self.rank,
                "world_size": self.world_size, "num_images": len(self.dataset)}

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "epoch": self.epoch, "batches": self.batches, "finished": self.finished,
                "read": self.read, "reasons": dict(self.reasons),
                "plan": [list(r) for r in self.plan] if self.plan is not None else None, "check": self._check()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION or state.get("check") != self._check():
            raise ValueError(f"loader state does not match this loader: saved {state.get('check')}, "
                             f"now {self._check()}")
        self.epoch, self.batches, self.finished = int(state["epoch"]), int(state["batches"]), bool(state["finished"])
        self.read, self.reasons = int(state["read"]), {str(k): int(v) for k, v in state["reasons"].items()}
        self.plan = _as_plan(state.get("plan"))

    def resume_from_ranks(self, states: list[dict[str, Any]]) -> None:
        """Continue the epoch of `states` (every rank's `state_dict()` of a run with another
        number of ranks or batch size) over the permutation positions none of them delivered."""
        _check_same_order(states, self._check(), ("source", "seed", "num_images"))
        self._start_epoch(int(states[0]["epoch"]))
        if all(s["finished"] for s in states):
            self.finished = True
            return
        plan = _as_plan(states[0].get("plan")) or [(0, len(self.dataset))]
        taken: Ranges = []
        for state in states:
            old = state["check"]
            start, stop = rank_range(plan_length(plan), old["rank"], old["world_size"])
            taken += plan_slice(plan, start, min(stop, start + int(state["batches"]) * old["batch_size"]))
        self.plan = subtract_ranges(plan, taken)
        log.info("rank %d: epoch %d continues over %d images not yet read by the %d ranks before",
                 self.rank, self.epoch, plan_length(self.plan), len(states))

    def stats(self) -> dict[str, Any]:
        skipped = sum(self.reasons.values())
        return {"samples_read": self.read, "samples_skipped": skipped, "reasons": dict(self.reasons),
                "bad_fraction": skipped / self.read if self.read else 0.0, "epoch": self.epoch, "batches": self.batches}

    def __iter__(self) -> Iterator[Batch]:
        if self.finished:
            self._start_epoch(self.epoch + 1)
        self.coco_dataset.set_epoch(self.epoch)  # before the workers receive their copy
        remaining = self._rank_batches()[self.batches :]
        batches = _data_loader(self.dataset, self.cfg, batch_sampler=remaining, collate_fn=_collate_skipping)
        for batch, read, reasons in batches:
            self.batches += 1
            self.read += read
            for reason, n in reasons.items():
                self.reasons[reason] = self.reasons.get(reason, 0) + n
            stats = self.stats()
            if reasons:
                log.warning("skipped %d bad samples: %s", sum(reasons.values()), reasons)
            check_bad_fraction(stats["samples_read"], stats["samples_skipped"], self.cfg.max_bad_fraction,
                               self.cfg.min_samples_for_bad_fraction, f"rank {self.rank} loader")
            if batch is not None:
                yield batch
        self.finished = True


def _collate_skipping(samples: list[Any]) -> tuple[Batch | None, int, dict[str, int]]:
    good = [s for s in samples if not isinstance(s, BadSample)]
    reasons: dict[str, int] = {}
    for s in samples:
        if isinstance(s, BadSample):
            reasons[s.reason] = reasons.get(s.reason, 0) + 1
    return (collate(good) if good else None), len(samples), reasons


def build_train_loader(
    cfg: Any, *, batch_size: int, rank: int, world_size: int, seed: int, epoch: int = 0
) -> TrainLoader | CocoTrainLoader:
    """The training loader over `cfg.train_shards` for one rank (see `TrainLoader`), or,
    when only `cfg.train_coco_images`/`train_coco_annotations` are set, over that COCO
    folder (`CocoTrainLoader`, same interface).

    `batch_size` is per rank; `cfg.num_workers` loader processes (spawned by default,
    `cfg.multiprocessing_context`) each read whole shards; `cfg.mode` picks finite epochs
    (every sample once across all ranks) or resampled ones (`cfg.samples_per_epoch`).
    Raises `BadDataError` when more than `cfg.max_bad_fraction` of the samples read (after
    `cfg.min_samples_for_bad_fraction`) were corrupt.
    """
    kwargs = dict(batch_size=batch_size, rank=rank, world_size=world_size, seed=seed, epoch=epoch)
    if cfg.train_shards:
        return TrainLoader(cfg, **kwargs)
    if cfg.train_coco_images and cfg.train_coco_annotations:
        return CocoTrainLoader(cfg, **kwargs)
    raise ValueError("set data.train_shards (WebDataset shards) or "
                     "data.train_coco_images + data.train_coco_annotations")


__all__ = ["BadDataError", "CocoTrainLoader", "TrainLoader", "build_train_loader"]
