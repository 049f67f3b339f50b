"""Prefetch copies ordered by CUDA events (all but host-issued copies), or synchronous on CPU.

Per unit (offloaded layer k, or with ``per_param`` one of its parameters), on CUDA:
  start(k): the compute stream records ``ready[k]`` (the slot's previous reader is queued before
            it), the copy stream waits on it, copies host -> slot, records ``done[k]``;
  wait(k):  the compute stream waits on ``done[k]``;
  join():   the compute stream waits on the copy stream, at the end of graphs run as CUDA graphs
            (a forked stream must rejoin before capture ends, and no event may cross between
            captured graphs); other graphs skip it, so the next forward's copies overlap it.
Streams are looked up when an op runs, never cached at trace time: cudagraph trees warm up and
capture on their own stream. On CPU start(k) is a synchronous copy and wait/join do nothing, so
the compiled graph is the same and a misplaced op gives wrong numbers there too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from ..planning import OffloadedLayer, OffloadPlan

log = logging.getLogger(__name__)

Copy = Callable[[int, str], None]
"""``copy(position, name)``: copy offloaded layer ``position``'s parameter ``name`` into its
slot, on the current stream."""
Unit = tuple[int, str | None]
"""(offloaded position, parameter name), or (position, None) for the whole layer."""


class SyncOrder:
    """Copies made when they are started (a CPU-only machine); each slot records which layer it
    holds, so that a wait for a layer whose slot holds another copies it first."""

    def __init__(self, plan: OffloadPlan, copy: Copy) -> None:
        self.plan = plan
        self._copy = copy
        self._owner: dict[tuple[int, str], int] = {}  # (slot, name) -> position held

    def start(self, layer: OffloadedLayer, names: tuple[str, ...]) -> None:
        for name in names:
            self._owner[(layer.slot, name)] = layer.position
            self._copy(layer.position, name)

    def wait(self, layer: OffloadedLayer, names: tuple[str, ...]) -> None:
        """A slot that holds another layer (a forward that skipped layers, or a layer split
        across graphs by a graph break) is filled here: slower, never wrong."""
        stale = tuple(n for n in names if self._owner.get((layer.slot, n)) != layer.position)
        if stale:
            self.start(layer, stale)

    def join(self) -> None:
        """Nothing is in flight."""

    def copy_again(self) -> None:
        """Copy what every slot holds again from the host copies (weights changed)."""
        for (_, name), position in self._owner.items():
            self.start(self.plan.layers[position], (name,))


class EventOrder(SyncOrder):
    """Copies on a copy stream of their own, ordered with the compute stream by events."""

    def __init__(
        self,
        plan: OffloadPlan,
        copy: Copy,
        device: torch.device,
        poison: Callable[[int, str], None] | None = None,
    ) -> None:
        super().__init__(plan, copy)
        self.device = device
        self._poison = poison
        self._copy_stream = torch.cuda.Stream(device)
        # units started and not yet waited for or joined -> started inside a CUDA graph capture
        self._pending: dict[Unit, bool] = {}
        units: list[Unit] = [(layer.position, None) for layer in plan.layers]
        units += [(layer.position, name) for layer in plan.layers for name in layer.params]
        with torch.cuda.device(device):  # created ahead: none may be created in a capture
            self._ready = {unit: torch.cuda.Event() for unit in units}
            self._done = {unit: torch.cuda.Event() for unit in units}

    def start(self, layer: OffloadedLayer, names: tuple[str, ...]) -> None:
        for name in names:
            self._owner[(layer.slot, name)] = layer.position
            if self._poison is not None:
                self._poison(layer.position, name)
        compute = torch.cuda.current_stream(self.device)
        unit = (layer.position, names[0] if len(names) == 1 else None)
        ready, done = self._ready[unit], self._done[unit]
        ready.record(compute)
        self._copy_stream.wait_event(ready)
        with torch.cuda.stream(self._copy_stream):
            for name in names:
                self._copy(layer.position, name)
        done.record(self._copy_stream)
        self._pending[unit] = torch.cuda.is_current_stream_capturing()

    def wait(self, layer: OffloadedLayer, names: tuple[str, ...]) -> None:
        super().wait(layer, names)
        units = [(layer.position, None), *((layer.position, n) for n in names)]
        self._check_capture([unit for unit in units if unit in self._pending])
        for unit in units:
            if self._pending.pop(unit, None) is not None:
                torch.cuda.current_stream(self.device).wait_event(self._done[unit])

    def join(self) -> None:
        if self._pending:
            self._check_capture(list(self._pending))
            self._pending.clear()
            torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)

    def copy_again(self) -> None:
        super().copy_again()
        self.join()  # a CUDA graph replayed next waits on its own copies only

    def _check_capture(self, units: list[Unit]) -> None:
        """Refuse to make a CUDA graph capture wait on copies started before it (CUDA would
        invalidate it: "dependency created on uncaptured work in another stream"), as a hand
        capture of a compile that leaves the next forward's copies in flight would."""
        if not units or not torch.cuda.is_current_stream_capturing():
            return
        outside = [unit for unit in units if not self._pending[unit]]
        if outside:
            layers = sorted({self.plan.layers[position].index for position, _ in outside})
            raise RuntimeError(
                f"offload: a CUDA graph capture would wait on copies of layers {layers} of "
                f"{self.plan.layers_path} started before it: this model was compiled to leave "
                "the next forward's copies in flight. To capture it outside Inductor, compile "
                "with prefetch.offload_capturable=True (mode='reduce-overhead' needs nothing)."
            )
