"""benchmarks.graph_trace on a small trace in Nsight Systems' SQLite layout."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from benchmarks.graph_trace import summarise

MiB = 2**20


def _trace(path: Path) -> Path:
    """Two calls of ``fast`` and one of ``slow``, each a graph launch (one correlation id)
    whose nodes are two 112 MiB copies and a kernel; a copy outside any range is ignored."""
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE StringIds (id INTEGER, value TEXT);
        CREATE TABLE NVTX_EVENTS (start INTEGER, end INTEGER, text TEXT, textId INTEGER);
        CREATE TABLE CUPTI_ACTIVITY_KIND_RUNTIME (start INTEGER, end INTEGER,
            correlationId INTEGER);
        CREATE TABLE CUPTI_ACTIVITY_KIND_KERNEL (start INTEGER, end INTEGER,
            correlationId INTEGER);
        CREATE TABLE CUPTI_ACTIVITY_KIND_MEMCPY (start INTEGER, end INTEGER,
            correlationId INTEGER, bytes INTEGER, copyKind INTEGER);
        """
    )
    db.execute("INSERT INTO StringIds VALUES (7, 'slow')")
    calls = [  # (range start, name or None with textId 7, copy ms, gap ms)
        (0, "fast", 2.0, 0.0),
        (10_000_000, "fast", 2.0, 0.0),
        (20_000_000, None, 2.2, 0.1),
    ]
    for i, (at, name, copy_ms, gap_ms) in enumerate(calls):
        db.execute("INSERT INTO NVTX_EVENTS VALUES (?, ?, ?, ?)", (at, at + 1000, name, 7))
        launch = (at + 10, at + 20, i)
        db.execute("INSERT INTO CUPTI_ACTIVITY_KIND_RUNTIME VALUES (?, ?, ?)", launch)
        first = at + 100_000  # the device starts later than the launch, outside the range
        second = first + int((copy_ms + gap_ms) * 1e6)
        for start in (first, second):
            db.execute(
                "INSERT INTO CUPTI_ACTIVITY_KIND_MEMCPY VALUES (?, ?, ?, ?, 1)",
                (start, start + int(copy_ms * 1e6), i, 112 * MiB),
            )
        db.execute(
            "INSERT INTO CUPTI_ACTIVITY_KIND_KERNEL VALUES (?, ?, ?)",
            (second + int(copy_ms * 1e6), second + int((copy_ms + 0.5) * 1e6), i),
        )
    db.execute("INSERT INTO CUPTI_ACTIVITY_KIND_RUNTIME VALUES (50000000, 50000010, 99)")
    db.execute("INSERT INTO CUPTI_ACTIVITY_KIND_MEMCPY VALUES (50000100, 60000000, 99, 8, 1)")
    db.commit()
    return path


def test_copies_grouped_by_the_range_around_their_launch(tmp_path: Path) -> None:
    summary = summarise(_trace(tmp_path / "t.sqlite"))
    assert set(summary) == {"fast", "slow"}
    fast, slow = summary["fast"], summary["slow"]
    assert (fast["calls"], slow["calls"]) == (2, 1)
    assert fast["copies"] == slow["copies"] == 2
    assert fast["copy_busy_ms"] == pytest.approx(4.0)
    assert fast["copy_gap_ms"] == pytest.approx(0.0)
    assert slow["copy_gap_ms"] == pytest.approx(0.1)
    assert slow["largest_gaps_us"] == [pytest.approx(100.0)]
    assert fast["span_ms"] == pytest.approx(4.5)
    assert slow["span_ms"] == pytest.approx(4.4 + 0.1 + 0.5)
    assert fast["large_copy_gbps"] == pytest.approx(112 * MiB / 2.0e6)
    assert slow["large_copy_gbps"] < fast["large_copy_gbps"]
