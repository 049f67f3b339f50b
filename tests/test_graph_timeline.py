"""benchmarks.graph_timeline: the summary of a device-side log, and the log a CUDA graph writes."""

from __future__ import annotations

import pytest
import torch

from benchmarks.graph_timeline import Timeline, summarise
from tests.common import prefetch_options
from tests.models import LlamaShaped

MiB = 2**20
MS = 1_000_000  # ns


def _log(calls: int) -> list[tuple[str, int]]:
    """``calls`` calls 10 ms apart, each: unit A (112 MiB) started at 0 and copied by 4 ms, the
    compute stream waiting for it from 1 to 4 ms; unit B (16 MiB) started at 6 (the copy engine
    idle from 4), copied by 7, waited for at 8 (no stall); the copy stream joined at 9. The copy
    engine is then idle until the next call's start at 10."""
    marks = [
        ("start 0:a", 0.0),
        ("reach 0:a", 1.0),
        ("copied 0:a", 4.0),
        ("released 0:a", 4.0),
        ("start 1:b", 6.0),
        ("copied 1:b", 7.0),
        ("reach 1:b", 8.0),
        ("released 1:b", 8.0),
        ("joined", 9.0),
    ]
    return [(label, int((10 * k + at) * MS)) for k in range(calls) for label, at in marks]


def test_summary_counts_busy_idle_and_stalls_per_call():
    units = {"0:a": 112 * MiB, "1:b": 16 * MiB}
    summary = summarise(_log(5), units)
    # the window runs from the second call's first wait to the last call's: three calls
    assert summary["calls"] == 3
    assert summary["ms_per_call"] == pytest.approx(10.0)
    assert summary["copy_busy_ms"] == pytest.approx(4.0 + 1.0)
    assert summary["copy_idle_ms"] == pytest.approx(2.0 + 3.0)
    assert summary["stall_ms"] == pytest.approx(3.0)
    assert summary["after_join_ms"] == pytest.approx(1.0)
    assert summary["copy_gbps"] == pytest.approx(128 * MiB / (5 * MS))
    assert summary["large_copy_gbps_median"] == pytest.approx(112 * MiB / (4 * MS))
    assert summary["units"]["0:a"] == {"busy_us": 4000.0, "idle_us": 3000.0, "stall_us": 3000.0}
    assert summary["units"]["1:b"] == {"busy_us": 1000.0, "idle_us": 2000.0, "stall_us": 0.0}


def test_a_copy_queued_behind_another_runs_from_its_end():
    """B started while A still copies: B's copy begins when A's ends, no idle between."""
    log = [
        (label, t + 10 * k * MS)
        for k in range(4)
        for label, t in [
            ("start 0:a", 0),
            ("start 1:b", 1 * MS),
            ("reach 0:a", 2 * MS),
            ("copied 0:a", 4 * MS),
            ("released 0:a", 4 * MS),
            ("copied 1:b", 6 * MS),
        ]
    ]
    summary = summarise(log, {"0:a": MiB, "1:b": MiB})
    assert summary["units"]["1:b"] == {"busy_us": 2000.0, "idle_us": 0.0, "stall_us": None}
    assert summary["copy_idle_ms"] == pytest.approx(4.0)  # 6 -> 10: between calls
    assert summary["after_join_ms"] is None


def test_a_log_without_enough_calls_is_refused():
    with pytest.raises(ValueError, match="no wait"):
        summarise([("start 0:a", 0), ("copied 0:a", 1)], {"0:a": 1})
    with pytest.raises(ValueError, match="2 calls"):
        summarise(_log(2), {"0:a": 1, "1:b": 1})


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replays_write_the_log():
    """Under reduce-overhead the stamps are nodes of the recorded graph: replays log every
    unit's marks once per call, in the order the device ran them, with the host stamping
    nothing (the runtime's Python does not run in a replay)."""
    torch.manual_seed(0)
    model = LlamaShaped(layers=4, dim=256, heads=8, kv_heads=4, hidden=512, vocab=512).cuda()
    options = prefetch_options(2, 1, 1, mode="reduce-overhead", poison_slots=False)
    options["prefetch"]["offload_host_copies"] = False  # copies and joins in the graphs
    timeline = Timeline(torch.device("cuda"))
    compiled = torch.compile(model, backend="offload", options=options)
    ids = torch.randint(0, 512, (1, 8), device="cuda")
    with torch.no_grad(), timeline.patched():
        for _ in range(3):  # compile, warm-up, recording
            compiled(ids)
        stamped = len(timeline.marks)
        timeline.reset()
        for _ in range(5):
            compiled(ids)
        log = timeline.read()
    assert len(timeline.marks) == stamped  # no Python op ran: the replays wrote the log
    counts = {label: sum(1 for entry in log if entry[0] == label) for label, _ in log}
    assert set(counts.values()) == {5}, counts
    kinds = {label.partition(" ")[0] for label in counts}
    assert kinds == {"start", "copied", "reach", "released", "joined"}
    times = {label: [t for name, t in log if name == label] for label in counts}
    for label in counts:  # each copy after its start, each wait released after it is reached
        kind, _, unit = label.partition(" ")
        before = {"copied": "start", "released": "reach"}.get(kind)
        if before:
            assert all(a <= b for a, b in zip(times[f"{before} {unit}"], times[label], strict=True))
    summary = summarise(log, timeline.unit_bytes)
    assert summary["calls"] == 3
    assert summary["copy_busy_ms"] > 0
    assert summary["copy_gbps"] > 1.0  # bytes per ns: more than 1 GB/s from pinned memory
