"""The host-copy protocol (`counters.SlotCounters`) against a simulated device.

`SimDevice` queues what the protocol issues on three streams (compute, copy, and the stream
that unblocks a failed capture) and captures kernels into a list that a "replay" appends to the
compute queue. `run` then executes the queues, each stream in order and the streams in an
interleaving chosen by a policy, as a GPU may: a read that finds the wrong layer in its slot
under any policy is an ordering bug, and a state where every stream waits is a deadlock.
The host issues everything before the device runs, the hardest case for the ordering.
"""

from __future__ import annotations

import random

import pytest

from offload_compiler.runtime.counter_device import _runs
from offload_compiler.runtime.counter_order import GraphProgram, SlotCounters

LAYERS = 3  # offloaded layer positions 0..2, all in slot 0 (prefetch_step 1)
ENTITIES = (0, 1)  # two parameters of the slot


class Deadlock(AssertionError):
    pass


class SimDevice:
    def __init__(self, size: int) -> None:
        self.landed = [0] * size
        self.released = [0] * size
        self.slot: list[int | None] = [None] * size
        self.queues: dict[str, list[tuple]] = {"compute": [], "copy": [], "unblock": []}
        self.capture: list[tuple] | None = None
        self.bad_reads: list[tuple] = []

    # the CounterDevice protocol
    def capturing(self) -> bool:
        return self.capture is not None

    def release(self, entity: int, value: int) -> None:
        self.queues["compute"].append(("set_released", entity, value))

    def wait(self, entity: int, value: int) -> None:
        self.queues["compute"].append(("wait_landed", entity, value))

    def copy(self, entity: int, position: int, ready: int, landed: int) -> None:
        self.queues["copy"].append(("copy", entity, position, ready, landed))

    def spin(self, entities) -> None:
        assert self.capture is not None
        self.capture.append(("spin", tuple(entities)))

    def bump(self, entities) -> None:
        assert self.capture is not None
        self.capture.append(("bump", tuple(entities)))

    def unblock(self, entity: int, value: int) -> None:
        self.queues["unblock"].append(("after_compute", len(self.queues["compute"])))
        self.queues["unblock"].append(("set_released", entity, value))

    # what the tests add: a kernel reading slots, on the stream (or capture) of the moment
    def read(self, entities, position: int) -> None:
        (self.capture if self.capture is not None else self.queues["compute"]).append(
            ("read", tuple(entities), position)
        )

    def run(self, policy: str, seed: int = 0) -> None:
        """Execute all queues; ``policy``: "compute" or "copy" first, or "random"."""
        rng = random.Random(seed)
        heads = dict.fromkeys(self.queues, 0)
        while any(heads[q] < len(self.queues[q]) for q in self.queues):
            ready = [
                q
                for q in self.queues
                if heads[q] < len(self.queues[q]) and self._can(self.queues[q][heads[q]], heads)
            ]
            if not ready:
                raise Deadlock({q: self.queues[q][heads[q] :][:2] for q in self.queues})
            preferred = policy if policy in ready else ready[0]
            q = rng.choice(ready) if policy == "random" else preferred
            self._do(self.queues[q][heads[q]])
            heads[q] += 1
        for q in self.queues:
            self.queues[q].clear()

    def _can(self, op: tuple, heads: dict[str, int]) -> bool:
        kind = op[0]
        if kind == "wait_landed":
            return self.landed[op[1]] >= op[2]
        if kind == "copy":
            return self.released[op[1]] >= op[3]
        if kind == "spin":
            return all(self.landed[e] >= self.released[e] + 1 for e in op[1])
        if kind == "after_compute":
            return heads["compute"] >= op[1]
        return True

    def _do(self, op: tuple) -> None:
        kind = op[0]
        if kind == "set_released":
            self.released[op[1]] = op[2]
        elif kind == "copy":
            _, e, position, _, landed = op
            self.slot[e] = position
            self.landed[e] = landed
        elif kind == "bump":
            for e in op[1]:
                self.released[e] += 1
        elif kind == "read":
            for e in op[1]:
                if self.slot[e] != op[2]:
                    self.bad_reads.append((e, op[2], self.slot[e]))


def _forward(counters: SlotCounters, device: SimDevice, positions=range(LAYERS)) -> None:
    """One forward over ``positions`` per parameter: wait, read, start the slot's next layer
    (the next position in the cycle of all layers, as the plan wraps it)."""
    for position in positions:
        for e in ENTITIES:
            counters.wait(position, [e])
            device.read([e], position)
            counters.start((position + 1) % LAYERS, [e])


def _setup() -> tuple[SlotCounters, SimDevice]:
    device = SimDevice(len(ENTITIES))
    counters = SlotCounters(len(ENTITIES), device)
    counters.start(0, list(ENTITIES))  # the runtime fills the first slot at creation
    return counters, device


def _record(counters, device, graph, positions=range(LAYERS)) -> list[tuple]:
    """A call that cudagraph trees record: capture, then an immediate replay."""
    with counters.calling(graph):
        device.capture = []
        _forward(counters, device, positions)
        recorded, device.capture = device.capture, None
        device.queues["compute"].extend(recorded)
    return recorded


def _replay(counters, device, graph, recorded) -> None:
    with counters.calling(graph):
        device.queues["compute"].extend(recorded)


POLICIES = [("compute", 0), ("copy", 0), *(("random", seed) for seed in range(5))]


@pytest.mark.parametrize(("policy", "seed"), POLICIES)
def test_warm_up_recording_and_replays_read_their_own_layers(policy, seed):
    counters, device = _setup()
    graph = GraphProgram()
    with counters.calling(graph):  # trees' warm-up: the ops run eagerly
        _forward(counters, device)
    assert graph.program is None
    recorded = _record(counters, device, graph)
    assert graph.program is not None
    # the graph holds the spins and bumps; its copies were issued during the capture
    assert [op[0] for op in recorded[:3]] == ["spin", "read", "bump"]
    for _ in range(4):
        _replay(counters, device, graph, recorded)
    device.run(policy, seed)
    assert device.bad_reads == []
    assert counters.releases == device.released
    assert counters.copies == device.landed


def test_a_replay_issues_the_program_copies_and_counts_its_releases():
    counters, device = _setup()
    graph = GraphProgram()
    recorded = _record(counters, device, graph)
    copies, releases = list(counters.copies), list(counters.releases)
    _replay(counters, device, graph, recorded)
    assert [c - b for c, b in zip(counters.copies, copies, strict=True)] == [LAYERS, LAYERS]
    assert [c - b for c, b in zip(counters.releases, releases, strict=True)] == [LAYERS, LAYERS]
    device.run("copy")
    assert device.bad_reads == []


@pytest.mark.parametrize(("policy", "seed"), POLICIES)
def test_other_graphs_and_eager_calls_between_replays(policy, seed):
    """A graph that stops after layer 0 (leaving layer 1 pending) and an eager forward that
    skips layer 1 run between replays: each replay's start is restored before it."""
    counters, device = _setup()
    full, partial = GraphProgram(), GraphProgram()
    recorded_full = _record(counters, device, full)
    recorded_partial = _record(counters, device, partial, positions=[0])
    assert counters.pending == [1, 1]
    for _ in range(2):
        _replay(counters, device, full, recorded_full)
        _replay(counters, device, partial, recorded_partial)
        _replay(counters, device, partial, recorded_partial)
        _forward(counters, device, positions=[0, 2])  # default mode, skipping a layer
        _replay(counters, device, full, recorded_full)
    device.run(policy, seed)
    assert device.bad_reads == []
    assert counters.releases == device.released


def test_a_graph_that_only_waits_gets_its_layer_back():
    """A graph that reads layer 0 and starts nothing (the starts are in another graph): after
    an eager start of layer 1 into the slot, its replay must still read layer 0."""
    counters, device = _setup()
    graph = GraphProgram()
    with counters.calling(graph):
        device.capture = []
        counters.wait(0, [0])
        device.read([0], 0)
        recorded, device.capture = device.capture, None
        device.queues["compute"].extend(recorded)
    counters.start(1, [0])
    _replay(counters, device, graph, recorded)
    device.run("copy")
    assert device.bad_reads == []


def test_a_missing_release_is_caught_by_the_simulation():
    """The check above can fail: a copy that does not wait for its slot's release lets the
    next layer overwrite the slot before its reader ran."""
    counters, device = _setup()
    original = device.copy
    device.copy = lambda e, position, ready, landed: original(e, position, 0, landed)
    _forward(counters, device)
    device.run("copy")
    assert device.bad_reads


def test_a_failed_capture_releases_what_its_copies_wait_for():
    counters, device = _setup()
    graph = GraphProgram()
    with pytest.raises(RuntimeError, match="capture broke"), counters.calling(graph):
        device.capture = []
        _forward(counters, device, positions=[0, 1])
        device.capture = None
        raise RuntimeError("capture broke")
    assert graph.program is None
    device.run("compute")  # without the unblocking writes the copy stream waits forever
    _forward(counters, device)
    device.run("copy")
    assert device.bad_reads == []


def test_a_capture_outside_trees_is_refused():
    counters, device = _setup()
    device.capture = []
    with pytest.raises(RuntimeError, match="offload_capturable=True"):
        counters.wait(0, [0])


def test_recordings_that_copy_differently_are_refused():
    counters, device = _setup()
    graph = GraphProgram()
    _record(counters, device, graph)
    with pytest.raises(RuntimeError, match="copy differently"), counters.calling(graph):
        device.capture = []  # a second recording of the "same" graph that does less
        _forward(counters, device, positions=[0])
        device.capture = None


def test_a_replay_without_a_recorded_program_is_an_error():
    counters, _ = _setup()
    with (
        pytest.raises(RuntimeError, match="replayed before its copies were recorded"),
        counters.calling(GraphProgram()),
    ):
        pass  # no op ran in Python: a replay


@pytest.mark.parametrize(
    ("entities", "runs"),
    [([], []), ([3], [(3, 1)]), ([0, 1, 2, 5, 6, 4], [(0, 3), (5, 2), (4, 1)])],
)
def test_runs_of_consecutive_entities(entities, runs):
    assert _runs(entities) == runs
