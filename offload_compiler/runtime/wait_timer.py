"""Timing of the prefetch waits of one runtime while a `measure_stalls` block is open: CUDA
events around each wait on the compute stream (so the time is what the wait held the stream up,
with no synchronization and no profiler), or the host clock on CPU, where a wait that finds its
slot holding another layer copies synchronously."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WaitTime:
    """One wait: the offloaded layer's position and the milliseconds it held up compute; the
    start marks the time of the forward's first wait, to measure time per forward."""

    position: int
    ms: float
    start: object  # a CUDA event or a host clock reading


class WaitTimer:
    """Marks around each wait of one runtime; waits inside a CUDA graph capture are skipped
    (events recorded there would time the capture, not the replays)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self._marks: list[tuple[int, object, object]] = []
        self._open: tuple[int, object] | None = None
        self.skipped = 0

    def before(self, position: int) -> None:
        if self.cuda and torch.cuda.is_current_stream_capturing():
            self.skipped += 1
            self._open = None
            return
        self._open = (position, self._mark())

    def after(self) -> None:
        if self._open is not None:
            position, start = self._open
            self._marks.append((position, start, self._mark()))
            self._open = None

    def times(self) -> list[WaitTime]:
        """Every wait timed so far, in order (synchronizes the device once)."""
        if self.cuda and self._marks:
            self._marks[-1][2].synchronize()
        return [WaitTime(p, self._elapsed_ms(s, e), s) for p, s, e in self._marks]

    def elapsed_ms(self, start: object, end: object) -> float:
        """Milliseconds between two marks of `times`."""
        return self._elapsed_ms(start, end)

    def _mark(self) -> object:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def _elapsed_ms(self, start: object, end: object) -> float:
        if self.cuda:
            return start.elapsed_time(end)
        return (end - start) * 1e3
