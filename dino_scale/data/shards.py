"""`ShardStream`: the IterableDataset each DataLoader worker runs over WebDataset shards
(local or s3://). It yields `(Batch, WorkerProgress)`; `TrainLoader` strips the progress,
which is what makes the position resumable. Works in spawned workers: it pickles as plain
settings and opens its filesystem lazily inside the worker."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from dino_scale.data.collate import Batch, collate
from dino_scale.data.samples import BadSample, augmentation_seed, decode_sample
from dino_scale.data.storage import Storage
from dino_scale.data.stream import (
    IndexShuffler,
    Ranges,
    finite_segments,
    mix_seed,
    plan_length,
    rank_range,
    read_segments,
    resampled_segments,
    worker_ranges,
)
from dino_scale.data.transforms import TrainTransform
from dino_scale.errors import UserError
from dino_scale.log import get_logger

log = get_logger("dino_scale.data.shards")

LOGGED_BAD_SAMPLES = 20


class BadDataError(UserError, RuntimeError):
    """Too large a fraction of the samples read was corrupt."""


@dataclass
class WorkerProgress:
    """Where one logical worker stands in its epoch (all counts cumulative for the epoch)."""

    worker: int
    position: int = 0  # samples emitted by the shuffler (valid or not)
    valid: int = 0
    batches: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def samples_read(self) -> int:
        return self.position

    def as_dict(self) -> dict[str, Any]:
        return {"worker": self.worker, "position": self.position, "valid": self.valid,
                "batches": self.batches, "skipped": dict(self.skipped)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkerProgress:
        return cls(int(d["worker"]), int(d["position"]), int(d["valid"]), int(d["batches"]),
                   {str(k): int(v) for k, v in d.get("skipped", {}).items()})


def check_bad_fraction(read: int, skipped: int, limit: float, min_samples: int, where: str) -> None:
    if read >= min_samples and read > 0 and skipped / read > limit:
        raise BadDataError(
            f"{where}: {skipped} of {read} samples read were bad ({skipped / read:.2%}), more than "
            f"data.max_bad_fraction={limit:.2%}; check the shards (rebuild with "
            "data_pipeline.build_shards) or raise the limit"
        )


class ShardStream(IterableDataset):
    def __init__(
        self, *, root: str, shards: list[tuple[str, int]], storage_options: dict[str, Any], mode: str,
        seed: int, epoch: int, rank: int, world_size: int, num_workers: int, batch_size: int,
        samples_per_rank: int, shuffle_buffer: int, transform: TrainTransform,
        resume: list[WorkerProgress] | None = None, worker_offset: int = 0,
        max_bad_fraction: float = 0.01, min_samples_for_bad_fraction: int = 100, plan: Ranges | None = None,
    ) -> None:
        super().__init__()
        self.root, self.shards, self.storage_options = root, shards, storage_options
        self.mode, self.seed, self.epoch = mode, seed, epoch
        self.rank, self.world_size, self.num_workers, self.batch_size = rank, world_size, num_workers, batch_size
        self.samples_per_rank, self.shuffle_buffer, self.transform = samples_per_rank, shuffle_buffer, transform
        self.resume = resume or [WorkerProgress(w) for w in range(num_workers)]
        self.worker_offset = worker_offset
        self.max_bad_fraction, self.min_samples = max_bad_fraction, min_samples_for_bad_fraction
        self.plan = plan  # the epoch's remaining global positions after an elastic resume (see stream.py)

    def __iter__(self) -> Iterator[tuple[Batch, WorkerProgress]]:
        info = get_worker_info()
        physical, count = (info.id, info.num_workers) if info is not None else (0, 1)
        if count != self.num_workers:
            raise RuntimeError(f"ShardStream planned for {self.num_workers} workers, runs in {count}")
        if info is not None:
            torch.set_num_threads(1)
        yield from self._worker_batches((physical + self.worker_offset) % self.num_workers)

    def _worker_batches(self, worker: int) -> Iterator[tuple[Batch, WorkerProgress]]:
        storage = Storage(self.root, self.storage_options)
        progress = WorkerProgress.from_dict(self.resume[worker].as_dict())
        if self.mode == "finite":
            segments = finite_segments(self.shards, self.seed, self.epoch, self.rank, self.world_size,
                                       worker, self.num_workers, self.batch_size, self.plan)
            total, quota = sum(len(s) for s in segments), None
        else:
            offset = self.plan[0][0] if self.plan else 0
            segments = resampled_segments(self.shards, self.seed, self.epoch, self.rank, worker, offset)
            start, stop = worker_ranges(self.samples_per_rank, self.batch_size, self.num_workers)[worker]
            total, quota = None, stop - start
            if quota <= 0:
                return
        shuffler = IndexShuffler(total, self.shuffle_buffer,
                                 mix_seed("buffer", self.seed, self.epoch, self.rank, worker))
        shuffler.skip(progress.position)
        reader = read_segments(segments, storage.open, shuffler.pending())
        ready: dict[int, Any] = {}
        skipped = Counter(progress.skipped)
        samples = []
        for index in shuffler:
            if quota is not None and progress.valid >= quota:
                break
            while index not in ready:
                got, item = next(reader)
                ready[got] = item
            item = ready.pop(index)
            progress.position += 1
            try:
                if isinstance(item, BadSample):
                    raise item
                key = item["__key__"] if "__draw__" not in item else f"{item['__key__']}@{item['__draw__']}"
                image, target = decode_sample(item, drop_crowd=True)
                rng = random.Random(augmentation_seed(self.seed, self.epoch, key))
                samples.append(self.transform(image, target, rng))
            except BadSample as bad:
                skipped[bad.reason] += 1
                progress.skipped = dict(skipped)
                n_bad = sum(skipped.values())
                if n_bad <= LOGGED_BAD_SAMPLES:
                    log.warning("rank %d worker %d: skipped sample %s (%s)", self.rank, worker,
                                item.get("__key__", "?") if isinstance(item, dict) else "?", bad)
                check_bad_fraction(progress.position, n_bad, self.max_bad_fraction, self.min_samples,
                                   f"rank {self.rank} loader worker {worker}")
                continue
            progress.valid += 1
            if len(samples) == self.batch_size or (quota is not None and progress.valid >= quota):
                progress.batches += 1
                yield collate(samples), WorkerProgress.from_dict(progress.as_dict())
                samples = []
        if samples:
            progress.batches += 1
            yield collate(samples), WorkerProgress.from_dict(progress.as_dict())


def rank_samples(mode: str, total: int, samples_per_epoch: int | None, rank: int, world_size: int,
                 plan: Ranges | None = None) -> int:
    """Samples this rank reads per epoch (finite: its slice; resampled: epoch / world); with
    an elastic-resume `plan`, its slice of the plan."""
    if plan is not None:
        start, stop = rank_range(plan_length(plan), rank, world_size)
        return stop - start
    if mode == "finite":
        start, stop = rank_range(total, rank, world_size)
        return stop - start
    if not samples_per_epoch:
        raise ValueError("data.mode=resampled needs data.samples_per_epoch")
    return samples_per_epoch // world_size
