"""Prefetch copies issued by the host around CUDA-graph replays, ordered with them by counters
in device memory (``prefetch.offload_host_copies``; the device side is `counter_device`): the
graphs hold the compute and, where the copies' events were, one-thread kernels on counters.

Each (slot, parameter name) is an *entity* e with two int32 counters on the device:
``landed[e]`` (copies into e finished) and ``released[e]`` (copies into e whose readers are
done). The host mirrors them (``copies``, ``releases``) and knows ``pending[e]``, the offloaded
layer whose copy into e is issued and not released (at most one is). The operations:

- copy(e, k), on the copy stream: wait until ``released[e] >= copies[e]`` (the previous
  occupant's readers are done), copy layer k's tensor, write ``landed[e] = copies[e] + 1``;
- release(e), after the last reader of e's pending copy: eagerly a stream write of
  ``releases[e] + 1``; captured, a kernel adding one, so a replay needs no host value;
- wait(e), before e's first reader: eagerly a stream wait for ``landed[e] >= releases[e] + 1``;
  captured, a kernel that reads ``released[e]`` and spins until ``landed[e]`` exceeds it.

A capture records the graph's `Program`: its releases and copies in graph order and the pending
state it starts from. Its copies are issued during the capture (cudagraph trees replay a new
recording at once and then synchronize, so they must already be queued) and after each later
replay by `SlotCounters.calling`, which also brings the pending state to the program's start
before each call (an unexpected copy is released unread, a missing one issued). A copy waits only
on releases queued before it or in its graph, and a wait only on copies queued before it or for
its graph, so no sequence of calls deadlocks; should this bookkeeping be wrong, a captured wait
traps after a time limit instead of hanging.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..planning import OffloadedLayer, OffloadPlan

log = logging.getLogger(__name__)

Step = tuple[int, int | None]
"""(entity, offloaded layer position copied into it), or (entity, None): a release."""


@dataclass(frozen=True)
class Program:
    """What one recording of a compiled graph does to the slots, in graph order."""

    start: tuple[tuple[int, int | None], ...]  # (entity, pending position) when it begins
    steps: tuple[Step, ...]


@dataclass
class GraphProgram:
    """One compiled graph's program for one runtime, from its first capture on: every recording
    of the graph (one per input shape) runs the same ops from the same state."""

    program: Program | None = None


class CounterDevice(Protocol):
    """The device side of the protocol (`CudaCounters`; the tests simulate it on CPU)."""

    def capturing(self) -> bool:
        """Whether the current stream is capturing a CUDA graph."""

    def release(self, entity: int, value: int) -> None:
        """Eagerly, on the current stream: ``released[entity] = value``."""

    def wait(self, entity: int, value: int) -> None:
        """Eagerly: the current stream waits until ``landed[entity] >= value``."""

    def copy(self, entity: int, position: int, ready: int, landed: int) -> None:
        """On the copy stream: wait until ``released[entity] >= ready``, copy layer
        ``position``'s tensor into the entity's slot, write ``landed[entity] = landed``."""

    def spin(self, entities: Sequence[int]) -> None:
        """Captured: a kernel that waits until ``landed[e] > released[e]`` for each entity."""

    def bump(self, entities: Sequence[int]) -> None:
        """Captured: a kernel that adds one to ``released[e]`` for each entity."""

    def unblock(self, entity: int, value: int) -> None:
        """After the work queued so far, off the copy stream: ``released[entity] = value``."""


@dataclass
class _Call:
    """What happened during one call of a compiled graph (see `SlotCounters.calling`)."""

    eager: bool = False
    start: dict[int, int | None] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    captured: bool = False


class SlotCounters:
    """The host's mirror of the counters, and the operations that keep device and mirror equal."""

    def __init__(self, size: int, device: CounterDevice) -> None:
        self.device = device
        self.copies = [0] * size
        self.releases = [0] * size
        self.pending: list[int | None] = [None] * size
        self._call: _Call | None = None

    def start(self, position: int, entities: Sequence[int]) -> None:
        """Copy layer ``position`` into ``entities``, their pending copies released first."""
        call = self._op()
        self._release([e for e in entities if self.pending[e] is not None], call)
        for e in entities:
            self._touch(e, call)
            self._issue_copy(e, position)
            if call is not None and call.captured:
                call.steps.append((e, position))

    def wait(self, position: int, entities: Sequence[int]) -> None:
        """Make the current stream wait until layer ``position`` has landed in ``entities``."""
        call = self._op()
        for e in entities:  # the program's start must have them pending, as now
            self._touch(e, call)
        stale = [e for e in entities if self.pending[e] != position]
        if stale:  # a forward that skipped a layer, or a layer split across graphs
            self.start(position, stale)
        if call is not None and call.captured:
            self.device.spin(entities)
        else:
            for e in entities:
                self.device.wait(e, self.releases[e] + 1)

    @contextlib.contextmanager
    def calling(self, graph: GraphProgram) -> Iterator[None]:
        """Around one call of a compiled graph under cudagraph trees: before it, the pending
        state brought to the start of ``graph``'s program; after a replay (no op ran in Python),
        the program's copies issued and its releases counted; after a capture, the program kept
        (its copies were issued during the capture)."""
        if graph.program is not None:
            self._prepare(graph.program)
        call = self._call = _Call()
        try:
            yield
        except BaseException:
            if call.captured:
                self._unblock(call)
            raise
        finally:
            self._call = None
        if call.captured:
            program = Program(tuple(call.start.items()), tuple(call.steps))
            if graph.program is None:
                graph.program = program
            elif graph.program != program:
                raise RuntimeError(
                    "offload: two CUDA-graph recordings of one compiled graph copy differently; "
                    "compile with prefetch.offload_host_copies=False"
                )
        elif not call.eager:
            if graph.program is None:
                raise RuntimeError(
                    "offload: a CUDA graph of an offloaded model was replayed before its copies "
                    "were recorded"
                )
            self._replayed(graph.program)

    def _op(self) -> _Call | None:
        """The call an op runs in (None outside `calling`), marked eager or captured; a capture
        outside `calling` is refused: nothing would issue its copies at replay."""
        call = self._call
        if self.device.capturing():
            if call is None:
                raise RuntimeError(
                    "offload: a CUDA graph capture outside cudagraph trees: to capture an "
                    "offloaded model by hand (torch.cuda.graph, a serving framework's CUDA-graph "
                    "wrapper), compile it with prefetch.offload_capturable=True"
                )
            call.captured = True
        elif call is not None:
            call.eager = True
        return call

    def _touch(self, e: int, call: _Call | None) -> None:
        if call is not None and call.captured:
            call.start.setdefault(e, self.pending[e])

    def _release(self, entities: Sequence[int], call: _Call | None) -> None:
        captured = call is not None and call.captured
        if captured and entities:
            self.device.bump(entities)
        for e in entities:
            self._touch(e, call)
            if captured:
                call.steps.append((e, None))
            else:
                self.device.release(e, self.releases[e] + 1)
            self._count_release(e)

    def _count_release(self, e: int) -> None:
        self.releases[e] += 1
        self.pending[e] = None

    def _issue_copy(self, e: int, position: int) -> None:
        if self.pending[e] is not None:
            raise AssertionError(f"offload: copy into entity {e} over an unreleased copy")
        self.device.copy(e, position, self.copies[e], self.copies[e] + 1)
        self.copies[e] += 1
        self.pending[e] = position

    def _prepare(self, program: Program) -> None:
        for e, wanted in program.start:
            if self.pending[e] == wanted:
                continue
            log.debug(
                "offload: entity %d holds %s, the graph starts from %s", e, self.pending[e], wanted
            )
            if self.pending[e] is not None:  # released unread, on the caller's stream
                self._release([e], None)
            if wanted is not None:
                self._issue_copy(e, wanted)

    def _replayed(self, program: Program) -> None:
        for e, position in program.steps:
            if position is None:  # the replay's kernel released it
                self._count_release(e)
            else:
                self._issue_copy(e, position)

    def _unblock(self, call: _Call) -> None:
        """A capture failed after issuing copies that wait on releases its graph would have made:
        make them from the host, so the copy stream drains (the mirror already counts them)."""
        for e in call.start:
            self.device.unblock(e, self.releases[e])


class CounterOrder:
    """Ordering by counters: one entity per (slot, parameter name), a layer's entities
    consecutive where they can be (the captured kernels take runs of entities)."""

    def __init__(
        self,
        plan: OffloadPlan,
        copy: Callable[[int, str], None],
        device: torch.device,
        poison: Callable[[int, str], None] | None = None,
    ) -> None:
        from .counter_device import CudaCounters

        self.device = device
        self._poison = poison
        self._entity: dict[tuple[int, str], int] = {}
        for layer in plan.layers:
            for name in layer.params:
                self._entity.setdefault((layer.slot, name), len(self._entity))
        self._names = {e: name for (_, name), e in self._entity.items()}
        self._copy_stream = torch.cuda.Stream(device)
        cuda = CudaCounters(
            len(self._entity),
            device,
            self._copy_stream,
            lambda entity, position: copy(position, self._names[entity]),
        )
        self.counters = SlotCounters(len(self._entity), cuda)

    def start(self, layer: OffloadedLayer, names: tuple[str, ...]) -> None:
        entities = self._entities(layer, names)
        if self._poison is not None:
            # only a release (of a pending copy) orders the fill before the copy; a slot with
            # nothing pending has no reader to catch
            for name, e in zip(names, entities, strict=True):
                if self.counters.pending[e] is not None:
                    self._poison(layer.position, name)
        self.counters.start(layer.position, entities)

    def wait(self, layer: OffloadedLayer, names: tuple[str, ...]) -> None:
        self.counters.wait(layer.position, self._entities(layer, names))

    def join(self) -> None:
        """Outside a capture (none of whose work is on the copy stream), wait for the copies."""
        if not torch.cuda.is_current_stream_capturing():
            torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)

    def copy_again(self) -> None:
        """Copy what every entity holds pending (copied, not yet read) again."""
        for e, position in enumerate(self.counters.pending):
            if position is not None:
                self.counters.start(position, [e])

    def _entities(self, layer: OffloadedLayer, names: tuple[str, ...]) -> list[int]:
        return [self._entity[(layer.slot, n)] for n in names]
