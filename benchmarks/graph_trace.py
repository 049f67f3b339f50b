"""Per variant of `benchmarks.mode_turns`, how its host-to-device copies ran: from an Nsight
Systems trace taken with CUDA-graph nodes traced one by one.

    nsys profile -t cuda,nvtx --cuda-graph-trace=node --sample=none --cpuctxsw=none \
        -o TRACE --export=sqlite python -m benchmarks.mode_turns --nvtx ...
    python -m benchmarks.graph_trace TRACE.sqlite --out summary.json

The torch profiler's CUPTI tracing made every variant equally slow (session 7), so which
recording replays slowly could not be seen in it. Here every call that ``mode_turns --nvtx``
times sits in an NVTX range named after its variant. Each copy and kernel is tied to the API
call that launched it (a ``cudaGraphLaunch`` for a replayed node, a ``cudaMemcpyAsync`` or
kernel launch otherwise) by its correlation id, and that call to the NVTX range around it.
Per variant, over its calls, it reports the medians of:

- ``span_ms``: first device activity of a call to its last (copies started for the next call
  included);
- ``copy_busy_ms``: time the host-to-device copies ran, and ``copies`` per call;
- ``copy_gap_ms``: summed idle time of the copy engine between the call's first and last copy
  (a copy waiting for its dependency, or a slow hand-over between two graph nodes);
- ``large_copy_gbps``: bandwidth of the copies of at least 64 MiB while they ran;
- ``largest_gaps_us``: the five largest gaps between two copies of the call.
"""

from __future__ import annotations

import argparse
import bisect
import json
import sqlite3
import statistics
from collections import defaultdict
from pathlib import Path

_HTOD = 1  # CUPTI_ACTIVITY_MEMCPY_KIND_HTOD
LARGE_COPY_BYTES = 64 * 2**20
"""Copies at least this large count for bandwidth: smaller ones are dominated by their latency."""


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def _ranges(db: sqlite3.Connection) -> tuple[list[int], list[tuple[int, int, str]]]:
    """The NVTX push/pop ranges, sorted by start: (starts, [(start, end, name)])."""
    columns = _columns(db, "NVTX_EVENTS")
    if "textId" in columns:
        name = "COALESCE(e.text, s.value)"
        join = "LEFT JOIN StringIds s ON s.id = e.textId"
    else:
        name, join = "e.text", ""
    rows = db.execute(
        f"SELECT e.start, e.end, {name} FROM NVTX_EVENTS e {join} "
        "WHERE e.end IS NOT NULL ORDER BY e.start"
    ).fetchall()
    rows = [r for r in rows if r[2]]
    return [r[0] for r in rows], rows


def summarise(path: Path) -> dict:
    db = sqlite3.connect(path)
    starts, ranges = _ranges(db)
    launched_at = dict(db.execute("SELECT correlationId, start FROM CUPTI_ACTIVITY_KIND_RUNTIME"))

    def call_of(correlation: int) -> tuple[str, int] | None:
        """(variant, range start) of the NVTX range around the launching API call."""
        at = launched_at.get(correlation)
        if at is None:
            return None
        i = bisect.bisect_right(starts, at) - 1
        if i < 0 or ranges[i][1] < at:
            return None
        return ranges[i][2], ranges[i][0]

    activity: dict[tuple[str, int], list[int]] = defaultdict(lambda: [2**63, 0])
    copies: dict[tuple[str, int], list[tuple[int, int, int]]] = defaultdict(list)
    for start, end, correlation in db.execute(
        "SELECT start, end, correlationId FROM CUPTI_ACTIVITY_KIND_KERNEL"
    ):
        call = call_of(correlation)
        if call is not None:
            span = activity[call]
            span[0], span[1] = min(span[0], start), max(span[1], end)
    for start, end, correlation, nbytes, kind in db.execute(
        "SELECT start, end, correlationId, bytes, copyKind FROM CUPTI_ACTIVITY_KIND_MEMCPY"
    ):
        call = call_of(correlation)
        if call is None:
            continue
        span = activity[call]
        span[0], span[1] = min(span[0], start), max(span[1], end)
        if kind == _HTOD:
            copies[call].append((start, end, nbytes))
    per_variant: dict[str, list[dict]] = defaultdict(list)
    for call, (first, last) in sorted(activity.items(), key=lambda item: item[0][1]):
        done = sorted(copies.get(call, []))
        gaps, busy_until = [], done[0][1] if done else 0
        for start, end, _ in done[1:]:  # idle time of the copy engine(s) between copies
            if start > busy_until:
                gaps.append(start - busy_until)
            busy_until = max(busy_until, end)
        large = [n / (e - s) for s, e, n in done if n >= LARGE_COPY_BYTES and e > s]
        per_variant[call[0]].append(
            {
                "span_ms": (last - first) / 1e6,
                "copy_busy_ms": sum(e - s for s, e, _ in done) / 1e6,
                "copies": len(done),
                "copy_gap_ms": sum(gaps) / 1e6,
                "large_copy_gbps": statistics.median(large) if large else None,
                "largest_gaps_us": [g / 1e3 for g in sorted(gaps, reverse=True)[:5]],
            }
        )
    summary = {}
    for variant, calls in per_variant.items():
        row: dict[str, object] = {"calls": len(calls)}
        for key in ("span_ms", "copy_busy_ms", "copies", "copy_gap_ms", "large_copy_gbps"):
            values = [c[key] for c in calls if c[key] is not None]
            row[key] = statistics.median(values) if values else None
        row["largest_gaps_us"] = [
            statistics.median(c["largest_gaps_us"][i] for c in calls)
            for i in range(min(len(c["largest_gaps_us"]) for c in calls))
        ]
        summary[variant] = row
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path, help="an nsys trace exported to SQLite")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    summary = summarise(args.trace)
    args.out.write_text(json.dumps(summary, indent=1))
    for variant, row in summary.items():
        print(variant, json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
