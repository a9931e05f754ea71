"""`dino_scale.data.layout`: every global step is made of the same micro-batches, with the
same keys, under any number of ranks x accumulation steps with the run's global batch."""

from __future__ import annotations

import itertools

import pytest
import torch

from dino_scale.data.collate import Batch
from dino_scale.data.layout import DataLayout, StepLoader, saved_positions


class CountingLoader:
    """Canonical rank `rank`'s micro-batches: batch b holds the image ids (rank, b, 0..n-1)."""

    def __init__(self, rank: int, num_batches: int, batch_size: int = 2) -> None:
        self.rank, self.num_batches, self.batch_size = rank, num_batches, batch_size
        self.epoch, self.position = 0, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]

    def stats(self) -> dict:
        return {"samples_read": self.position * self.batch_size, "samples_skipped": 0, "reasons": {},
                "batches": self.position}

    def __iter__(self):
        while self.position < self.num_batches:
            ids = [(self.rank, self.position, i) for i in range(self.batch_size)]
            self.position += 1
            yield Batch(torch.zeros(self.batch_size, 3, 4, 4), torch.zeros(self.batch_size, 4, 4, dtype=torch.bool),
                        [{"image_id": i} for i in ids])


def _steps(layout: DataLayout, world: int, accumulation: int, num_batches: int = 6, positions=None, steps: int = 0):
    """Per global step: the set of (image id, key) every rank of the run trains."""
    per_rank = []
    for rank in range(world):
        loader = StepLoader(lambda c: CountingLoader(c, num_batches), layout, rank=rank, world=world,
                            accumulation=accumulation, epoch=0)
        if positions is not None:
            loader.load_positions(positions, steps)
        per_rank.append([[(t["image_id"], m.key) for m in step for t in m.batch.targets] for step in loader])
    lengths = {len(r) for r in per_rank}
    assert len(lengths) == 1
    return [sorted(sum((r[s] for r in per_rank), [])) for s in range(lengths.pop())]


@pytest.mark.parametrize("ranks,accumulation", [(2, 1), (4, 1), (2, 3), (6, 1)])
def test_every_split_of_the_global_batch_trains_the_same_steps(ranks, accumulation):
    layout = DataLayout(ranks=ranks, micro_batch=2, accumulation=accumulation, workers=1)
    canonical = _steps(layout, ranks, accumulation)
    slots = ranks * accumulation
    assert len(canonical) == 6 // accumulation
    for world in range(1, slots + 1):
        if slots % world:
            assert not layout.serves(world, 2, 1)
            continue
        assert layout.serves(world, 2, slots // world)
        assert _steps(layout, world, slots // world) == canonical, world
    # each step: the canonical ranks' next `accumulation` micro-batches, each image once
    first = canonical[0]
    assert sorted(i for i, _ in first) == sorted(itertools.product(range(ranks), range(accumulation), range(2)))
    assert len({k for _, k in first}) == slots


def test_a_resumed_loader_continues_with_the_next_step_in_another_layout():
    layout = DataLayout(ranks=2, micro_batch=2, accumulation=1, workers=1)
    full = _steps(layout, 2, 1)
    # two steps on 2 ranks, then the positions of both canonical ranks go to 1 rank x 2
    first = StepLoader(lambda c: CountingLoader(c, 6), layout, rank=0, world=2, accumulation=1, epoch=0)
    second = StepLoader(lambda c: CountingLoader(c, 6), layout, rank=1, world=2, accumulation=1, epoch=0)
    for loader in (first, second):
        iterator = iter(loader)
        next(iterator), next(iterator)
    positions = saved_positions([first.state_dict(), second.state_dict()])
    assert positions.steps == 2 and sorted(positions.loaders) == [0, 1]
    assert _steps(layout, 1, 2, positions=positions.loaders, steps=positions.steps) == full[2:]


def test_positions_of_disagreeing_ranks_and_impossible_splits_are_refused():
    layout = DataLayout(ranks=2, micro_batch=2, accumulation=1, workers=1)
    a = StepLoader(lambda c: CountingLoader(c, 6), layout, rank=0, world=2, accumulation=1, epoch=0)
    b = StepLoader(lambda c: CountingLoader(c, 6), layout, rank=1, world=2, accumulation=1, epoch=0)
    next(iter(a))
    with pytest.raises(ValueError, match="disagree"):
        saved_positions([a.state_dict(), b.state_dict()])
    with pytest.raises(ValueError, match="another format"):
        saved_positions([{"epoch": 0, "batches": 3}])
    with pytest.raises(ValueError, match="cannot serve"):
        layout.slots(0, 3, 1)
    assert not layout.serves(1, 4, 1)  # same global batch, another micro-batch: not the same steps
