"""One logging setup for every entry point: rank-aware console output, per-rank files,
and progress bars that stay quiet in CI logs."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")

_FORMAT = "%(asctime)s %(levelname)s [rank %(rank)s] %(name)s: %(message)s"


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def current_rank() -> int:
    """Global rank from the launcher's environment (0 when not distributed)."""
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def setup_logging(
    log_dir: str | os.PathLike | None = None,
    rank: int | None = None,
    level: int = logging.INFO,
    all_ranks_to_console: bool = False,
) -> logging.Logger:
    """Configure the `dino_scale` root logger.

    Rank 0 (or every rank with `all_ranks_to_console`) prints to stderr; when `log_dir`
    is given every rank also writes `log_dir/rank{N}.log`. Calling it again replaces the
    handlers, so entry points and tests can call it freely.
    """
    rank = current_rank() if rank is None else rank
    logger = logging.getLogger("dino_scale")
    logger.setLevel(level)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(_FORMAT, datefmt="%H:%M:%S")
    rank_filter = _RankFilter(rank)
    if rank == 0 or all_ranks_to_console:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(formatter)
        console.addFilter(rank_filter)
        logger.addHandler(console)
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(Path(log_dir) / f"rank{rank}.log")
        file_handler.setFormatter(formatter)
        file_handler.addFilter(rank_filter)
        logger.addHandler(file_handler)
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
    for name in ("data_pipeline",):
        other = logging.getLogger(name)
        other.handlers = logger.handlers
        other.setLevel(level)
        other.propagate = False
    return logger


def get_logger(name: str) -> logging.Logger:
    """Logger under the project's hierarchy (`dino_scale.x` / `data_pipeline.x`)."""
    return logging.getLogger(name)


def progress_enabled() -> bool:
    """Progress bars only on an interactive rank-0 terminal and never under CI."""
    if os.environ.get("CI") or os.environ.get("DINO_NO_PROGRESS"):
        return False
    return current_rank() == 0 and sys.stderr.isatty()


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[T]:
    """tqdm over `iterable` when `progress_enabled()`, else the iterable itself."""
    if not progress_enabled():
        yield from iterable
        return
    yield from tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True)
