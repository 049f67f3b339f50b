"""The stall report: how long each prefetch wait held up the compute stream, per offloaded layer,
and the time per forward against the copy bound and the predicted time.

    with offload_compiler.measure_stalls(model, tokens=2048) as stalls:
        for _ in range(20):
            compiled(ids)
    print(stalls.report())

Events around each wait (`runtime.wait_timer`), no profiler and no synchronization until the
report: cheap enough to leave on in a benchmark. Waits inside CUDA graphs (``mode=
"reduce-overhead"``) are not timed, since an event recorded in a capture times the capture.
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from .runtime.prefetcher import OffloadRuntime
from .runtime.registry import runtimes_of
from .runtime.wait_timer import WaitTimer


@dataclass(frozen=True)
class LayerStalls:
    """The waits of one offloaded layer."""

    name: str
    waits: int
    total_ms: float
    max_ms: float


@dataclass(frozen=True)
class StackStalls:
    """One offloaded stack's waits over the measured calls."""

    stack: str
    forwards: int
    """Passes through the first offloaded layer, whose first wait marks each forward."""
    forward_ms: float | None
    """Median time from one forward's first wait to the next one's (None below two)."""
    copy_ms: float
    """The offloaded bytes over this machine's measured H2D bandwidth: the copy bound."""
    predicted_ms: float | None
    """max(predicted compute, copy bound), when ``tokens`` was given."""
    layers: tuple[LayerStalls, ...]
    untimed_waits: int
    """Waits inside CUDA graph captures (not timed)."""

    def __str__(self) -> str:
        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f}"

        stalled = sum(layer.total_ms for layer in self.layers)
        lines = [
            f"offload stalls of {self.stack}: {self.forwards} forwards, "
            f"{ms(self.forward_ms)} ms per forward (median); copy bound {self.copy_ms:.2f} ms, "
            f"predicted {ms(self.predicted_ms)} ms; waits held compute "
            f"{stalled / max(1, self.forwards):.2f} ms per forward",
        ]
        if self.untimed_waits:
            lines.append(f"  {self.untimed_waits} waits ran inside CUDA graphs and are not timed")
        lines += [
            "",
            "| layer | waits | stalled ms | per forward ms | max ms |",
            "|---|---:|---:|---:|---:|",
        ]
        for layer in self.layers:
            per = layer.total_ms / max(1, self.forwards)
            lines.append(
                f"| {layer.name} | {layer.waits} | {layer.total_ms:.3f} | {per:.3f} | "
                f"{layer.max_ms:.3f} |"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class StallReport:
    """The stall report of every offloaded stack of a model."""

    stacks: tuple[StackStalls, ...]

    def __str__(self) -> str:
        return "\n\n".join(map(str, self.stacks))


class StallMeter:
    """The waits timed inside a `measure_stalls` block; `report` reads them."""

    def __init__(self, model: nn.Module, tokens: int | None) -> None:
        self._model = model
        self._tokens = tokens
        self._timers: list[tuple[OffloadRuntime, WaitTimer]] = []

    def report(self) -> StallReport:
        """The report of what was timed so far (synchronizes the device once per stack)."""
        return StallReport(tuple(self._stack(rt, timer) for rt, timer in self._timers))

    def _start(self) -> None:
        runtimes = runtimes_of(self._model)
        if not runtimes:
            raise ValueError(
                f"{type(self._model).__name__} has no offloaded layers in this process: compile "
                "it with backend='offload' and call it once before measuring its stalls"
            )
        for runtime in runtimes:
            if runtime.timer is not None:
                raise RuntimeError(f"the stalls of {runtime.plan.layers_path} are measured already")
            runtime.timer = WaitTimer(runtime.device)
            self._timers.append((runtime, runtime.timer))

    def _stop(self) -> None:
        for runtime, _ in self._timers:
            runtime.timer = None

    def _stack(self, runtime: OffloadRuntime, timer: WaitTimer) -> StackStalls:
        from .costs import machine_costs
        from .planner import predicted_compute_ms

        times = timer.times()
        starts = [
            t.start
            for i, t in enumerate(times)
            if t.position == 0 and (i == 0 or times[i - 1].position != 0)
        ]
        gaps = [timer.elapsed_ms(a, b) for a, b in itertools.pairwise(starts)]
        costs = machine_costs(runtime.device)
        copy_ms = runtime.host_bytes / (costs.h2d_gbps * 1e6)
        predicted = None
        if self._tokens is not None:
            params = list(self._model.parameters())
            numel = sum(p.numel() for p in params)
            itemsize = sum(p.numel() * p.element_size() for p in params) / max(1, numel)
            compute = predicted_compute_ms(numel, itemsize, self._tokens, costs)
            predicted = max(compute, copy_ms)
        layers = []
        for layer in runtime.plan.layers:
            mine = [t.ms for t in times if t.position == layer.position]
            layers.append(LayerStalls(layer.name, len(mine), sum(mine), max(mine, default=0.0)))
        return StackStalls(
            stack=runtime.plan.layers_path,
            forwards=len(starts),
            forward_ms=statistics.median(gaps) if gaps else None,
            copy_ms=copy_ms,
            predicted_ms=predicted,
            layers=tuple(layers),
            untimed_waits=timer.skipped,
        )


@contextlib.contextmanager
def measure_stalls(model: nn.Module, tokens: int | None = None) -> Iterator[StallMeter]:
    """Time every prefetch wait of ``model``'s compiled graphs inside the block; ``tokens``
    (the calls' token count) adds the predicted time per forward. Compile and call the model
    once before, so that its stacks are offloaded."""
    meter = StallMeter(model, tokens)
    meter._start()
    try:
        yield meter
    finally:
        meter._stop()
