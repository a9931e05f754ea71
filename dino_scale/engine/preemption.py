"""SIGTERM as a request to checkpoint and stop (preemption), polled between optimizer steps.

While a `Preemption` is entered, SIGTERM is blocked in the calling thread and polled once
per optimizer step. Processes started meanwhile (data-loader workers) inherit the blocked
mask: the DeepSpeed launcher sends SIGTERM to a rank's children before the rank, and a
worker killed under the rank would abort it before it can checkpoint. The handler covers
threads started earlier, where the signal is not blocked.
"""

from __future__ import annotations

import signal
import traceback
from types import FrameType, TracebackType
from typing import Any


class Preemption:
    def __init__(self) -> None:
        self.requested = False
        self._previous_handler: Any = None

    def __enter__(self) -> Preemption:
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if signal.SIGTERM in signal.sigpending():
            signal.sigtimedwait([signal.SIGTERM], 0)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        signal.signal(signal.SIGTERM, self._previous_handler)

    def poll(self) -> bool:
        """Whether a stop was requested (a pending SIGTERM is consumed)."""
        if not self.requested and signal.SIGTERM in signal.sigpending():
            signal.sigtimedwait([signal.SIGTERM], 0)
            self.requested = True
        return self.requested

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True


def release_frames(exc: BaseException | None) -> None:
    """Drop the local variables of the frames `exc` (and its causes) went through.

    A DataLoader iterator that re-raises a worker's error is in that error's traceback (as
    `self`), and the traceback lives until the interpreter exits. Its workers block SIGTERM,
    so the interpreter, waiting for them at exit, would hang the rank instead of failing.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)  # skips frames still running
        exc = exc.__cause__ or exc.__context__
