"""Prefetch copies issued by the host around CUDA-graph replays, ordered with them by counters
in device memory (``prefetch.offload_host_copies``, on by default on CUDA).

Why: under ``mode="reduce-overhead"`` a graph that holds its prefetch copies as memcpy nodes
ran every copy 2-4% slower in some recordings on the H100 (docs/benchmarks.md, session 11), and
at decode the copies are the step time; the same copies issued by the host run at the copy
floor. So the CUDA graphs hold the compute and, where the copies' events were, one-thread
kernels on counters; the host issues the copies on the copy stream.

Each (slot, parameter name) is an *entity* e with two int32 counters on the device:
``landed[e]`` (copies into e that have finished) and ``released[e]`` (copies into e whose
readers are done). The host mirrors them exactly (``copies``, ``releases``) and knows
``pending[e]``, the offloaded layer whose copy into e is issued and not released (at most one
is). The three operations:

- copy(e, k), on the copy stream: wait until ``released[e] >= copies[e]`` (the previous
  occupant's readers are done), copy layer k's tensor, write ``landed[e] = copies[e] + 1``;
- release(e), where the last reader of e's pending copy is queued: eagerly a stream write of
  ``releases[e] + 1``; inside a capture a kernel adding one, so a replay needs no host value;
- wait(e), before e's first reader: eagerly a stream wait for ``landed[e] >= releases[e] + 1``;
  inside a capture a kernel that reads ``released[e]`` and spins until ``landed[e]`` exceeds it.

A capture records the graph's `Program`: its releases and copies in graph order and the pending
state it starts from. Its copies are issued during the capture (cudagraph trees replay a new
recording at once and then synchronize the device, so they must already be queued) and after
each later replay by `SlotCounters.calling`, which also brings the pending state back to the
program's start before each call (a copy the graph does not expect is released unread, a missing
one issued). A copy waits only on releases queued before it or in the same graph, and a wait only
on copies queued before it or for the same graph, so no sequence of calls deadlocks; were this
bookkeeping ever wrong, a captured wait traps after `WAIT_LIMIT_S` instead of hanging forever.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

log = logging.getLogger(__name__)

WAIT_LIMIT_S = 120.0
"""How long a captured wait spins before it traps (the CUDA context then reports a launch
failure): far beyond any copy queue, which drains at tens of GB/s."""

Step = tuple[int, int | None]
"""(entity, offloaded layer position copied into it), or (entity, None): a release."""


@dataclass(frozen=True)
class Program:
    """What one recording of a compiled graph does to the slots, in graph order."""

    start: tuple[tuple[int, int | None], ...]  # (entity, pending position) when it begins
    steps: tuple[Step, ...]


@dataclass
class GraphProgram:
    """The program of one compiled graph for one runtime, from its first capture on. Every
    recording of the graph (one per input shape) runs the same ops from the same state."""

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
            self._copy(e, position, call)

    def wait(self, position: int, entities: Sequence[int]) -> None:
        """Make the current stream wait until layer ``position`` has landed in ``entities``
        (copying it first where another layer is pending there)."""
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
        state brought to where ``graph``'s program starts; after it, if the call replayed a
        recording (no op ran in Python), the program's copies issued and its releases counted;
        if it captured one, the program kept (its copies were issued during the capture)."""
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
        if not entities:
            return
        for e in entities:
            self._touch(e, call)
        if call is not None and call.captured:
            self.device.bump(entities)
            call.steps += [(e, None) for e in entities]
        else:
            for e in entities:
                self.device.release(e, self.releases[e] + 1)
        for e in entities:
            self._count_release(e)

    def _count_release(self, e: int) -> None:
        self.releases[e] += 1
        self.pending[e] = None

    def _copy(self, e: int, position: int, call: _Call | None) -> None:
        self._touch(e, call)
        self._issue_copy(e, position)
        if call is not None and call.captured:
            call.steps.append((e, position))

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
        """A capture failed after issuing copies that wait on releases its graph would have
        made: make those releases from the host, after the work queued so far, so that the
        copy stream drains (the mirror already counts them)."""
        for e in call.start:
            self.device.unblock(e, self.releases[e])


class StreamMemOps:
    """``cuStreamWaitValue32`` (greater or equal) and ``cuStreamWriteValue32`` from the
    driver, on 32-bit counters in device memory."""

    def __init__(self) -> None:
        cuda = ctypes.CDLL("libcuda.so.1")
        args = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        self._wait = getattr(cuda, "cuStreamWaitValue32_v2", None) or cuda.cuStreamWaitValue32
        self._write = getattr(cuda, "cuStreamWriteValue32_v2", None) or cuda.cuStreamWriteValue32
        for fn in (self._wait, self._write):
            fn.argtypes, fn.restype = args, ctypes.c_int

    def wait_geq(self, stream: torch.cuda.Stream, address: int, value: int) -> None:
        """``stream`` waits until the int32 at ``address`` is >= ``value`` (modulo 2**32)."""
        self._check(self._wait(stream.cuda_stream, address, value & 0xFFFFFFFF, 0), "Wait")

    def write(self, stream: torch.cuda.Stream, address: int, value: int) -> None:
        """``stream`` writes ``value`` to the int32 at ``address``, after a memory fence."""
        self._check(self._write(stream.cuda_stream, address, value & 0xFFFFFFFF, 0), "Write")

    @staticmethod
    def _check(result: int, what: str) -> None:
        if result != 0:
            raise RuntimeError(f"cuStream{what}Value32 failed: CUresult {result}")


def _build_kernels() -> tuple[Any, Any]:
    """The captured wait and release kernels (Triton, absent from CPU-only installs)."""
    import triton
    import triton.language as tl

    # first/count unspecialised and the counters always fresh allocations: one build each,
    # made (and its module loaded) before any capture or counter wait
    @triton.jit(do_not_specialize=["first", "count", "limit_ns"])
    def spin(landed_ptr, released_ptr, first, count, limit_ns):
        begin = tl.inline_asm_elementwise(
            "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
        )
        for e in range(first, first + count):
            need = tl.atomic_add(released_ptr + e, 0, sem="relaxed") + 1
            have = tl.atomic_add(landed_ptr + e, 0, sem="acquire")
            now = begin
            while (have - need < 0) & (now - begin < limit_ns):
                have = tl.atomic_add(landed_ptr + e, 0, sem="acquire")
                now = tl.inline_asm_elementwise(
                    "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
                )
            if have - need < 0:
                tl.inline_asm_elementwise(
                    "trap; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1
                )

    @triton.jit(do_not_specialize=["first", "count"])
    def bump(released_ptr, first, count):
        for e in range(first, first + count):
            tl.atomic_add(released_ptr + e, 1, sem="release")

    return spin, bump


def _runs(entities: Sequence[int]) -> list[tuple[int, int]]:
    """``entities`` as (first, count) runs of consecutive values, in order."""
    runs: list[list[int]] = []
    for e in entities:
        if runs and runs[-1][0] + runs[-1][1] == e:
            runs[-1][1] += 1
        else:
            runs.append([e, 1])
    return [(first, count) for first, count in runs]


class CudaCounters:
    """The counters in device memory, the stream memory operations and the captured kernels.

    ``copy_tensor(entity, position)`` issues, on the current stream, the copy of layer
    ``position``'s tensor into the entity's slot buffer.
    """

    def __init__(
        self,
        size: int,
        device: torch.device,
        copy_stream: torch.cuda.Stream,
        copy_tensor: Callable[[int, int], None],
    ) -> None:
        self._device = device
        self._copy_stream = copy_stream
        self._copy_tensor = copy_tensor
        self._memops = StreamMemOps()
        self._spin, self._bump = _build_kernels()
        self._limit_ns = int(WAIT_LIMIT_S * 1e9)
        with torch.cuda.device(device):
            self.landed = torch.zeros(size, dtype=torch.int32, device=device)
            self.released = torch.zeros(size, dtype=torch.int32, device=device)
            self._unblocking = torch.cuda.Stream(device)
            # built and loaded now: a module load waits for the device, which would never
            # finish while the copy stream sits on a counter that only this kernel moves
            self._launch_spin(0, 0)
            self._launch_bump(0, 0)
            torch.cuda.synchronize(device)  # the zeros are in place before any stream waits

    def capturing(self) -> bool:
        return torch.cuda.is_current_stream_capturing()

    def release(self, entity: int, value: int) -> None:
        self._memops.write(self._current(), self._address(self.released, entity), value)

    def wait(self, entity: int, value: int) -> None:
        self._memops.wait_geq(self._current(), self._address(self.landed, entity), value)

    def copy(self, entity: int, position: int, ready: int, landed: int) -> None:
        stream = self._copy_stream
        self._memops.wait_geq(stream, self._address(self.released, entity), ready)
        with torch.cuda.stream(stream):
            self._copy_tensor(entity, position)
        self._memops.write(stream, self._address(self.landed, entity), landed)

    def spin(self, entities: Sequence[int]) -> None:
        for first, count in _runs(entities):
            self._launch_spin(first, count)

    def bump(self, entities: Sequence[int]) -> None:
        for first, count in _runs(entities):
            self._launch_bump(first, count)

    def unblock(self, entity: int, value: int) -> None:
        self._unblocking.wait_stream(self._current())
        self._memops.write(self._unblocking, self._address(self.released, entity), value)

    def _current(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self._device)

    @staticmethod
    def _address(counters: torch.Tensor, entity: int) -> int:
        return counters.data_ptr() + counters.element_size() * entity

    def _launch_spin(self, first: int, count: int) -> None:
        self._spin[(1,)](self.landed, self.released, first, count, self._limit_ns, num_warps=1)

    def _launch_bump(self, first: int, count: int) -> None:
        self._bump[(1,)](self.released, first, count, num_warps=1)


def counters_available(device: torch.device) -> str | None:
    """Why host copies cannot run on ``device`` (None when they can)."""
    if device.type != "cuda":
        return "not a CUDA device"
    if torch.version.hip is not None:
        return "ROCm"
    try:
        import triton  # noqa: F401

        ctypes.CDLL("libcuda.so.1").cuStreamWriteValue32  # noqa: B018
    except (ImportError, OSError, AttributeError) as err:
        return str(err)
    return None
