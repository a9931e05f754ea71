"""Sample order for streaming shards: which samples each (rank, worker) reads, in what
order, and how to resume at any point of that order without decoding what came before.

The order is computed from the manifest's per-shard sample counts only, so it is known
before any byte is read:

- finite mode: shards are shuffled with (seed, epoch); their samples, concatenated, form
  one global sequence; rank r takes the contiguous slice [N*r/R, N*(r+1)/R) and splits it
  among its workers in whole batches (worker w gets the batches w, w+W, ... by count), so
  every sample is read exactly once and each worker reads only a few whole shards plus at
  most two partial ones. After a resume on a different number of ranks or workers the
  epoch continues over a *plan*: the ranges of that global sequence not yet trained
  (`unread_plan`), split the same way, so no sample of the epoch is read twice or skipped.
- resampled mode: each (rank, worker) draws whole shards with replacement from its own
  RNG, endlessly; the epoch is a fixed number of valid samples.

Within a worker, a shuffle buffer permutes the sample sequence. The permutation is
computed on sample *indices* (`IndexShuffler`), so resuming after P emitted samples means
replaying P cheap index steps and then reading only the samples still needed.
"""

from __future__ import annotations

import hashlib
import math
import random
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from dino_scale.data.samples import BadSample
from dino_scale.log import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) of one shard (in file order); `draw` numbers resampled draws."""

    shard: str
    start: int
    stop: int
    draw: int = -1

    def __len__(self) -> int:
        return self.stop - self.start


def mix_seed(*parts: object) -> int:
    """A 64-bit RNG seed from any tuple of ints/strings, stable across processes."""
    text = ":".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def shuffled_shards(shards: list[tuple[str, int]], seed: int, epoch: int) -> list[tuple[str, int]]:
    order = sorted(shards)
    random.Random(mix_seed("shards", seed, epoch)).shuffle(order)
    return order


def rank_range(total: int, rank: int, world_size: int) -> tuple[int, int]:
    return total * rank // world_size, total * (rank + 1) // world_size


def worker_ranges(n: int, batch_size: int, num_workers: int) -> list[tuple[int, int]]:
    """Split n samples among workers in whole batches: worker w gets as many batches as
    there are indices w, w+W, w+2W, ... below ceil(n / batch_size) (the last one may be short)."""
    num_batches = math.ceil(n / batch_size)
    ranges, pos = [], 0
    for worker in range(num_workers):
        stop = min(n, pos + len(range(worker, num_batches, num_workers)) * batch_size)
        ranges.append((pos, stop))
        pos = stop
    return ranges


def slice_segments(shards: list[tuple[str, int]], start: int, stop: int) -> list[Segment]:
    """The segments covering positions [start, stop) of the shards' concatenation."""
    segments, base = [], 0
    for name, count in shards:
        lo, hi = max(start, base), min(stop, base + count)
        if lo < hi:
            segments.append(Segment(name, lo - base, hi - base))
        base += count
        if base >= stop:
            break
    return segments


Ranges = list[tuple[int, int]]  # sorted, disjoint [start, stop) ranges of global positions


def plan_length(plan: Ranges) -> int:
    return sum(stop - start for start, stop in plan)


def plan_slice(plan: Ranges, start: int, stop: int) -> Ranges:
    """The global ranges holding positions [start, stop) of the plan's concatenation."""
    out, base = [], 0
    for lo, hi in plan:
        a, b = max(start, base), min(stop, base + hi - lo)
        if a < b:
            out.append((lo + a - base, lo + b - base))
        base += hi - lo
        if base >= stop:
            break
    return out


def subtract_ranges(plan: Ranges, taken: Ranges) -> Ranges:
    """`plan` without the positions in `taken` (both sorted-or-not lists of ranges)."""
    out: Ranges = []
    cuts = sorted(taken)
    for lo, hi in plan:
        pos = lo
        for a, b in cuts:
            if b <= pos or a >= hi:
                continue
            if a > pos:
                out.append((pos, a))
            pos = max(pos, b)
        if pos < hi:
            out.append((pos, hi))
    return out


def rank_worker_plan(plan: Ranges, rank: int, world_size: int, worker: int, num_workers: int,
                     batch_size: int) -> Ranges:
    """The global ranges (in order) that (rank, worker) reads from `plan`: rank r takes
    the contiguous slice [M*r/R, M*(r+1)/R) of the plan's M positions, its workers whole
    batches of that slice (`worker_ranges`)."""
    r_start, r_stop = rank_range(plan_length(plan), rank, world_size)
    w_start, w_stop = worker_ranges(r_stop - r_start, batch_size, num_workers)[worker]
    return plan_slice(plan, r_start + w_start, r_start + w_stop)


def finite_segments(
    shards: list[tuple[str, int]], seed: int, epoch: int, rank: int, world_size: int,
    worker: int, num_workers: int, batch_size: int, plan: Ranges | None = None,
) -> list[Segment]:
    """Segments (rank, worker) reads in finite mode; `plan` (default: the whole epoch)
    restricts the epoch to some ranges of the shuffled shards' concatenation."""
    order = shuffled_shards(shards, seed, epoch)
    plan = plan if plan is not None else [(0, sum(count for _, count in order))]
    mine = rank_worker_plan(plan, rank, world_size, worker, num_workers, batch_size)
    return [segment for start, stop in mine for segment in slice_segments(order, start, stop)]


def emitted_ranges(sequence: Ranges, shuffle_buffer: int, seed: int, position: int) -> Ranges:
    """Global positions a worker reading `sequence` through an `IndexShuffler(seed)` had
    emitted after `position` samples: read inputs minus what still sat in the buffer."""
    shuffler = IndexShuffler(plan_length(sequence), shuffle_buffer, seed)
    shuffler.skip(position)
    local = subtract_ranges([(0, shuffler.next_input)], [(i, i + 1) for i in shuffler.buffer])
    return [r for start, stop in local for r in plan_slice(sequence, start, stop)]


def resampled_segments(shards: list[tuple[str, int]], seed: int, epoch: int, rank: int, worker: int,
                       offset: int = 0) -> Iterator[Segment]:
    """Whole shards drawn uniformly with replacement, forever. `offset` > 0 (the epoch's
    global sample count at an elastic resume) starts a stream keyed by that position."""
    order = sorted(s for s in shards if s[1] > 0)
    if not order:
        raise ValueError("no non-empty shards to resample from")
    key = ("resample", seed, epoch, rank, worker) + ((offset,) if offset else ())
    rng = random.Random(mix_seed(*key))
    draw = 0
    while True:
        name, count = order[rng.randrange(len(order))]
        yield Segment(name, 0, count, draw)
        draw += 1


class IndexShuffler:
    """Shuffle buffer over input indices 0, 1, 2, ... (`total=None`: endless).

    The buffer is filled to `size`, then a random entry is emitted and its slot refilled by
    the next input; at the end the rest is emitted in random order. Read-ahead is bounded
    by `size`, and the emitted order depends only on (total, size, seed).
    """

    def __init__(self, total: int | None, size: int, seed: int) -> None:
        self.total, self.size = total, max(1, size)
        self.rng = random.Random(seed)
        self.buffer: list[int] = []
        self.next_input = 0
        self.emitted = 0

    def __iter__(self) -> IndexShuffler:
        return self

    def __next__(self) -> int:
        while len(self.buffer) < self.size and (self.total is None or self.next_input < self.total):
            self.buffer.append(self.next_input)
            self.next_input += 1
        if not self.buffer:
            raise StopIteration
        slot = self.rng.randrange(len(self.buffer))
        index = self.buffer[slot]
        self.buffer[slot] = self.buffer[-1]
        self.buffer.pop()
        self.emitted += 1
        return index

    def skip(self, count: int) -> None:
        for _ in range(count):
            next(self)

    def pending(self) -> Callable[[int], bool]:
        """Predicate: is input index i still to be emitted (buffered or not yet read)?"""
        threshold, buffered = self.next_input, frozenset(self.buffer)
        return lambda i: i >= threshold or i in buffered


@dataclass
class TarPosition:
    """Where the next sample of a tar starts: its ordinal and its first header's byte offset."""

    ordinal: int = 0
    offset: int = 0


def iter_tar(stream: BinaryIO, wanted: Callable[[int], bool], stop: int,
             position: TarPosition | None = None) -> Iterator[tuple[int, dict]]:
    """(ordinal, sample) for the samples of a WebDataset tar, in file order, up to `stop`.

    A sample groups consecutive members sharing a key (basename up to the first dot).
    Only wanted samples have their member data read into memory. `stream` starts at
    `position` (a sample boundary); `position` is advanced past each sample before it is
    yielded, so a reader that fails can reopen the tar there.
    """
    position = position if position is not None else TarPosition()
    start = position.offset
    ordinal, key, sample = position.ordinal - 1, None, None
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            member_key, _, extension = member.name.rsplit("/", 1)[-1].partition(".")
            if member_key != key:
                position.ordinal, position.offset = ordinal + 1, start + member.offset
                if sample is not None:
                    yield ordinal, sample
                ordinal += 1
                if ordinal >= stop:
                    return
                key = member_key
                sample = {"__key__": key} if wanted(ordinal) else None
            if sample is not None:
                sample[extension] = tar.extractfile(member).read()
        position.ordinal = ordinal + 1
        if sample is not None:
            yield ordinal, sample


def read_segments(
    segments: Iterable[Segment], open_shard: Callable[[str], BinaryIO], pending: Callable[[int], bool],
    retries: int = 3,
) -> Iterator[tuple[int, dict | BadSample]]:
    """(input index, raw sample or BadSample) for every pending index, in input order.

    Segments with nothing pending are not opened. Opening a shard is retried, and so is a
    read that fails part-way (a dropped connection): the shard is reopened at the first
    sample not yet read, so nothing is read twice. A shard that still cannot be opened or
    read, or that ends early or is corrupt (neither retried), yields BadSample for each of
    its pending samples not read.
    """
    base = 0
    for segment in segments:
        first, length = base, len(segment)
        base += length
        if not any(pending(first + k) for k in range(length)):
            continue

        def wanted(ordinal: int, segment: Segment = segment, first: int = first) -> bool:
            return segment.start <= ordinal and pending(first + ordinal - segment.start)

        seen: set[int] = set()
        position = TarPosition()
        for attempt in range(retries + 1):
            try:
                stream = _open_with_retries(open_shard, segment.shard, retries)
            except OSError as exc:
                failure, detail = "shard_unreadable", f"{segment.shard}: {exc}"
                break
            try:
                with stream:
                    if position.offset:
                        stream.seek(position.offset)
                    for ordinal, sample in iter_tar(stream, wanted, segment.stop, position):
                        seen.add(ordinal)
                        if segment.draw >= 0:
                            sample["__draw__"] = segment.draw
                        yield first + ordinal - segment.start, sample
            except (tarfile.TarError, EOFError) as exc:
                failure, detail = "truncated_tar", f"{segment.shard}: {exc}"
                break
            except OSError as exc:
                failure, detail = "shard_read_error", f"{segment.shard}: {exc}"
                if attempt < retries:
                    log.warning("reading %s failed at sample %d (%s); reopening there (retry %d of %d)",
                                segment.shard, position.ordinal, exc, attempt + 1, retries)
                    time.sleep(0.5 * 2**attempt)
                continue
            failure, detail = "truncated_tar", f"{segment.shard}: ended before sample {segment.stop}"
            break
        for ordinal in range(segment.start, segment.stop):
            index = first + ordinal - segment.start
            if ordinal not in seen and pending(index):
                yield index, BadSample(failure, detail)


def _open_with_retries(open_shard: Callable[[str], BinaryIO], name: str, retries: int) -> BinaryIO:
    for attempt in range(retries + 1):
        try:
            return open_shard(name)
        except FileNotFoundError:
            raise
        except OSError:
            if attempt == retries:
                raise
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")
