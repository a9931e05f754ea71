"""The samples of every global batch, whatever the number of ranks (elastic determinism).

A run's *data layout* is how its first start split each global batch: `ranks` x
`accumulation` micro-batches of `micro_batch` images, each rank's loader with `workers`
workers. That layout's per-rank loaders (the *canonical ranks*) define the sample order: global
step s is micro-batches s*A .. s*A+A-1 (A = accumulation) of every canonical rank.

A run resumed on R' ranks with A' accumulation steps (same micro-batch, R' x A' = R x A)
trains the same micro-batches in the same steps. The R x A slots of a global batch are
numbered q = c*A + i (canonical rank c, its i-th micro-batch of the step); rank r' serves
slots r'*A' .. r'*A'+A'-1 in that order. A rank whose slots belong to several canonical ranks
runs their loaders side by side (their workers add up: 2 x W processes after 2 ranks -> 1);
a canonical rank whose slots are split over several ranks (1 rank -> 2) is read by each of
them, each training its own slots (its samples decoded once per such rank).

`StepLoader` iterates one rank's share of each global step, as `MicroBatch`es that carry a
key (epoch, canonical rank, micro-batch index, relayout count) from which the trainer seeds
the random draws of that micro-batch's forward pass (denoising noise, dropout): the same
micro-batch draws the same numbers under any layout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from dino_scale.data.collate import Batch
from dino_scale.data.loader import ResumableLoader
from dino_scale.data.stream import mix_seed

STATE_VERSION = 1


@dataclass(frozen=True)
class DataLayout:
    ranks: int
    micro_batch: int
    accumulation: int
    workers: int

    @property
    def global_batch(self) -> int:
        return self.ranks * self.micro_batch * self.accumulation

    def serves(self, world: int, micro_batch: int, accumulation: int) -> bool:
        """Whether a run of `world` ranks x `accumulation` x `micro_batch` can train this
        layout's micro-batches step for step (same micro-batch size and global batch)."""
        return micro_batch == self.micro_batch and world * accumulation == self.ranks * self.accumulation

    def slots(self, rank: int, world: int, accumulation: int) -> list[tuple[int, int]]:
        """(canonical rank, micro-batch index within the step) of `rank`'s micro-steps, in order."""
        if world * accumulation != self.ranks * self.accumulation:
            raise ValueError(f"{world} ranks x {accumulation} micro-batches cannot serve a layout of "
                             f"{self.ranks} x {self.accumulation}")
        return [divmod(q, self.accumulation) for q in range(rank * accumulation, (rank + 1) * accumulation)]

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class MicroBatch:
    batch: Batch
    key: int  # seeds the micro-batch's random draws; equal under any layout


class StepLoader:
    """One rank's micro-batches of each global step of `layout` (see the module docstring).

    make_loader(c): the loader of canonical rank c (built for `layout.ranks` ranks and
    `layout.workers` workers). `for step in loader` yields lists of `accumulation`
    `MicroBatch`es and stops when any canonical rank this rank reads has no full step left.
    `state_dict()` is the position after the last yielded step; `relayouts` counts the
    changes of layout within the epoch (part of the keys, so no key repeats).
    """

    def __init__(self, make_loader: Callable[[int], ResumableLoader], layout: DataLayout, *, rank: int,
                 world: int, accumulation: int, epoch: int, relayouts: int = 0) -> None:
        self.layout, self.epoch, self.relayouts = layout, epoch, relayouts
        self.slots = layout.slots(rank, world, accumulation)
        self.canonical_ranks = sorted({c for c, _ in self.slots})
        self.loaders = {c: make_loader(c) for c in self.canonical_ranks}
        for loader in self.loaders.values():
            loader.set_epoch(epoch)
        self.steps = 0  # global steps of this epoch under this layout so far

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "layout": self.layout.as_dict(), "epoch": self.epoch,
                "relayouts": self.relayouts, "steps": self.steps,
                "loaders": {str(c): loader.state_dict() for c, loader in self.loaders.items()}}

    def load_positions(self, states: dict[int, dict[str, Any]], steps: int) -> None:
        """Continue from the saved positions of the canonical ranks (same layout)."""
        missing = [c for c in self.canonical_ranks if c not in states]
        if missing:
            raise ValueError(f"the checkpoint has no loader position for canonical ranks {missing}")
        for c, loader in self.loaders.items():
            loader.load_state_dict(states[c])
        self.steps = steps

    def stats(self) -> dict[str, Any]:
        """The loaders' counts summed (`reasons` merged)."""
        total: dict[str, Any] = {"samples_read": 0, "samples_skipped": 0, "reasons": {}, "epoch": self.epoch,
                                 "batches": 0}
        for loader in self.loaders.values():
            stats = loader.stats()
            for key in ("samples_read", "samples_skipped", "batches"):
                total[key] += int(stats.get(key, 0))
            for reason, n in stats.get("reasons", {}).items():
                total["reasons"][reason] = total["reasons"].get(reason, 0) + n
        total["bad_fraction"] = total["samples_skipped"] / total["samples_read"] if total["samples_read"] else 0.0
        return total

    def key(self, canonical_rank: int, index: int) -> int:
        return mix_seed("micro", self.epoch, self.relayouts, canonical_rank, index) % 2**63

    def __iter__(self) -> Iterator[list[MicroBatch]]:
        per_step = self.layout.accumulation
        iterators = {c: iter(loader) for c, loader in self.loaders.items()}
        while True:
            fetched: dict[int, list[Batch]] = {}
            for c in self.canonical_ranks:
                fetched[c] = [b for b in (next(iterators[c], None) for _ in range(per_step)) if b is not None]
                if len(fetched[c]) < per_step:
                    return
            base = self.steps * per_step
            self.steps += 1
            yield [MicroBatch(fetched[c][i], self.key(c, base + i)) for c, i in self.slots]


@dataclass
class SavedPositions:
    layout: DataLayout
    epoch: int
    steps: int
    relayouts: int
    loaders: dict[int, dict[str, Any]]  # canonical rank -> its loader's state


def saved_positions(rank_states: list[dict[str, Any]]) -> SavedPositions:
    """The position every saved rank's `StepLoader.state_dict()` describes (ranks that read
    the same canonical rank saved the same position of it)."""
    if any(s.get("version") != STATE_VERSION for s in rank_states):
        raise ValueError("the checkpoint's loader positions are of another format (saved before data layouts)")
    first = rank_states[0]
    if any((s["layout"], s["epoch"], s["steps"], s["relayouts"])
           != (first["layout"], first["epoch"], first["steps"], first["relayouts"]) for s in rank_states):
        raise ValueError("the ranks' loader positions disagree on the data layout, epoch or step")
    loaders = {int(c): state for s in rank_states for c, state in s["loaders"].items()}
    return SavedPositions(DataLayout(**first["layout"]), int(first["epoch"]), int(first["steps"]),
                          int(first["relayouts"]), loaders)
