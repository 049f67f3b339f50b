"""Timestamps the device writes inside the offloaded forward, CUDA graphs included.

Session 10 found that some CUDA-graph recordings of the offloaded model replay 3% slower than
others of identical code, and only when a kernel precedes their launch; where inside a replay
the time goes needs the timing of single graph nodes. Nsight Systems cannot import a trace on
the device (no ``libdw.so.1``) and the torch profiler's tracing made every variant equally slow
(session 7). So the device writes its own timeline: while `Timeline.patched` is active, the
runtime's ops each launch a one-thread kernel that appends (mark, ``%globaltimer``) to a log in
device memory, at

- ``start U``: on the compute stream where unit U's copy is started (its slot's last read done);
- ``copied U``: on the copy stream right after U's copy (left out with ``copies=False``, which
  keeps the copy stream free of kernels);
- ``reach U`` / ``released U``: on the compute stream before and after its wait for U's copy;
- ``joined``: after the copy stream is rejoined at the end of a CUDA-graph forward;

(U = ``position:parameter``). A graph recorded meanwhile holds these kernels as nodes, so a
replay writes the log as eager calls do; the log's index is an atomic counter on the device,
so no host work is needed between calls. `summarise` turns a log into per-call figures: the
copy engine's busy and idle time, bandwidth per copy, and how long the compute stream waited.
With host copies (``prefetch.offload_host_copies``, session 12) a replay's copies are issued
by the host, not replayed: only the compute marks (``start``, ``reach``, ``released``) are in
the graphs then.
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
from collections import defaultdict
from collections.abc import Iterator
from unittest import mock

import torch

from benchmarks.graph_trace import LARGE_COPY_BYTES
from offload_compiler.planning import OffloadedLayer
from offload_compiler.runtime import OffloadRuntime


def _stamp_kernel():  # built on first use: Triton is absent from CPU-only installs
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["mark"])  # one build for every mark, none in a capture
    def stamp(log_ptr, counter_ptr, mark, capacity):
        now = tl.inline_asm_elementwise(
            "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
        )
        slot = tl.atomic_add(counter_ptr, 1) % capacity
        tl.store(log_ptr + 2 * slot, mark.to(tl.int64))
        tl.store(log_ptr + 2 * slot + 1, now)

    return stamp


class Timeline:
    """A device-side log of marks with the device's global nanosecond timer."""

    def __init__(self, device: torch.device, copies: bool = True, capacity: int = 2**18) -> None:
        self.copies = copies
        self.capacity = capacity
        self.log = torch.zeros(capacity, 2, dtype=torch.int64, device=device)
        self.counter = torch.zeros(1, dtype=torch.int32, device=device)
        self.marks: dict[str, int] = {}
        self.unit_bytes: dict[str, int] = {}
        self._kernel = _stamp_kernel()
        self.stamp("compiled")  # JIT-compiled here: a module load may not run in a capture
        self.reset()

    def stamp(self, label: str) -> None:
        """Append ``label`` with the time the current stream reaches this point."""
        mark = self.marks.setdefault(label, len(self.marks))
        self._kernel[(1,)](self.log, self.counter, mark, self.capacity, num_warps=1)

    def reset(self) -> None:
        """Empty the log (the device idle: call between runs)."""
        torch.cuda.synchronize()
        self.counter.zero_()
        torch.cuda.synchronize()

    def read(self) -> list[tuple[str, int]]:
        """The log since the last reset, in the order the device appended it."""
        torch.cuda.synchronize()
        count = int(self.counter.item())
        if count > self.capacity:
            raise RuntimeError(f"timeline log overflowed: {count} marks, room for {self.capacity}")
        labels = {mark: label for label, mark in self.marks.items()}
        return [(labels[int(m)], int(t)) for m, t in self.log[:count].tolist()]

    @contextlib.contextmanager
    def patched(self) -> Iterator[Timeline]:
        """The runtime's start, wait and join stamping the log meanwhile (compiles and CUDA
        graphs recorded meanwhile keep the stamps)."""
        start, wait, join = OffloadRuntime._start, OffloadRuntime.wait, OffloadRuntime.join
        timeline = self

        def stamped_start(runtime: OffloadRuntime, layer: OffloadedLayer, name: str | None) -> None:
            unit = f"{layer.position}:{name}"
            if unit not in timeline.unit_bytes:  # once: eager variants start units every call
                host = runtime._host[layer.position]
                names = layer.params if name is None else (name,)
                timeline.unit_bytes[unit] = sum(host[n].nbytes for n in names)
            timeline.stamp(f"start {unit}")
            start(runtime, layer, name)
            if timeline.copies:
                with torch.cuda.stream(runtime._copy_stream):
                    timeline.stamp(f"copied {unit}")

        def stamped_wait(
            runtime: OffloadRuntime, layer_index: int, name: str | None = None
        ) -> None:
            unit = f"{runtime.plan.layer_at(layer_index).position}:{name}"
            timeline.stamp(f"reach {unit}")
            wait(runtime, layer_index, name)
            timeline.stamp(f"released {unit}")

        def stamped_join(runtime: OffloadRuntime) -> None:
            pending = bool(runtime._pending)
            join(runtime)
            if pending:
                timeline.stamp("joined")

        with (
            mock.patch.object(OffloadRuntime, "_start", stamped_start),
            mock.patch.object(OffloadRuntime, "wait", stamped_wait),
            mock.patch.object(OffloadRuntime, "join", stamped_join),
        ):
            yield self


def summarise(entries: list[tuple[str, int]], unit_bytes: dict[str, int]) -> dict:
    """Per-call figures of a log of back-to-back calls (`Timeline.read`), in ms unless said.

    The calls are counted by the first ``reach`` mark of the log: the window runs from its
    second occurrence (the first call may still differ, a run's first in default mode copies
    its first layer again) to its last, and copies and waits inside the window count.

    - ``ms_per_call``: median time between two occurrences of that mark;
    - ``copy_busy_ms``: summed time copies ran per call: a copy runs from the later of its
      start mark and the previous copy's end (one copy stream) to its ``copied`` mark;
      ``copy_idle_ms`` the time the copy engine had nothing to do in between;
    - ``copy_gbps``: bytes copied over busy time; ``large_copy_gbps_median``: median
      bandwidth of the copies of at least 64 MiB;
    - ``stall_ms``: summed time the compute stream waited for copies per call;
    - ``after_join_ms``: from ``joined`` (a CUDA-graph forward's end) to the next mark, the
      next call's first work: the device-side gap between two calls;
    - ``units``: per unit, median µs busy, idle before it, and compute stalled on it.
    """
    reaches = [label for label, _ in entries if label.startswith("reach ")]
    if not reaches:
        raise ValueError("the log has no wait: no offloaded layer ran")
    clock = [t for label, t in entries if label == reaches[0]]
    if len(clock) < 3:
        raise ValueError(f"the log holds {len(clock)} calls; at least 3 are needed")
    begin, end = clock[1], clock[-1]
    calls = len(clock) - 2
    latest: dict[str, int] = {}  # "start U" / "reach U" -> time of its latest occurrence
    copies: list[tuple[int, int, str]] = []  # (copied, started, unit)
    stalls: dict[str, list[float]] = defaultdict(list)
    stall_ns = 0
    for label, t in entries:
        kind, _, unit = label.partition(" ")
        if kind in ("start", "reach"):
            latest[label] = t
        elif kind == "copied" and f"start {unit}" in latest:
            copies.append((t, latest[f"start {unit}"], unit))
        elif kind == "released" and f"reach {unit}" in latest:
            waited = t - latest[f"reach {unit}"]
            if begin <= t < end:
                stall_ns += waited
                stalls[unit].append(waited / 1e3)
    copies.sort()
    busy_ns = idle_ns = copied_bytes = 0
    busy: dict[str, list[float]] = defaultdict(list)
    idle: dict[str, list[float]] = defaultdict(list)
    gbps_large = []
    for previous, (done, started, unit) in itertools.pairwise(copies):
        ran_from = max(started, previous[0])
        if not begin <= done < end:
            continue
        busy_ns += done - ran_from
        idle_ns += ran_from - previous[0]
        copied_bytes += unit_bytes[unit]
        busy[unit].append((done - ran_from) / 1e3)
        idle[unit].append((ran_from - previous[0]) / 1e3)
        if unit_bytes[unit] >= LARGE_COPY_BYTES and done > ran_from:
            gbps_large.append(unit_bytes[unit] / (done - ran_from))
    order = sorted(entries, key=lambda entry: entry[1])
    after_join = [
        (nxt[1] - here[1]) / 1e6
        for here, nxt in itertools.pairwise(order)
        if here[0] == "joined" and begin <= here[1] < end
    ]
    units = sorted(set(busy) | set(stalls))
    return {
        "calls": calls,
        "ms_per_call": statistics.median(b - a for a, b in itertools.pairwise(clock[1:])) / 1e6,
        "copy_busy_ms": busy_ns / calls / 1e6,
        "copy_idle_ms": idle_ns / calls / 1e6,
        "copy_gbps": copied_bytes / busy_ns if busy_ns else None,
        "large_copy_gbps_median": statistics.median(gbps_large) if gbps_large else None,
        "stall_ms": stall_ns / calls / 1e6,
        "after_join_ms": statistics.median(after_join) if after_join else None,
        "units": {
            unit: {
                "busy_us": statistics.median(busy[unit]) if busy[unit] else None,
                "idle_us": statistics.median(idle[unit]) if idle[unit] else None,
                "stall_us": statistics.median(stalls[unit]) if stalls[unit] else None,
            }
            for unit in units
        },
    }
