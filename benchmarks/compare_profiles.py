"""Modes against default mode across several `benchmarks.profile_offload` runs, one row each.

    python -m benchmarks.compare_profiles RUN_DIR... [--tokens 2048]

A slowdown that belongs to one model (docs/benchmarks.md, session 15) shows in some processes
and not others, so a variant is judged over many runs, each its own process: this prints, per
run directory, every mode's median ms per call as a percentage above that run's default mode,
and per mode how many runs it was more than 1% slower in. Runs with several models of one mode
(``reduce-overhead.2``) list each.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(run: Path, tokens: int) -> dict[str, float]:
    """Median ms per call of each mode of one run at ``tokens`` (its ``<mode>-<tokens>.json``)."""
    found = {}
    for path in sorted(run.glob(f"*-{tokens}.json")):
        summary = json.loads(path.read_text())
        found[summary["mode"]] = summary["ms"]
    return found


def compare(runs: list[Path], tokens: int) -> tuple[list[str], dict[str, list[int]]]:
    """Markdown rows (run, then each mode's percentage against default) and, per mode, how
    many runs it was measured in and how many it was more than 1% slower in."""
    modes: list[str] = []
    tables = {}
    for run in runs:
        times = load(run, tokens)
        if "default" not in times:
            raise ValueError(f"{run}: no default-mode summary at {tokens} tokens")
        tables[run] = times
        modes += [m for m in times if m != "default" and m not in modes]
    rows = [f"| run | default ms | {' | '.join(modes)} |", "| --- " * (len(modes) + 2) + "|"]
    slower = {mode: [0, 0] for mode in modes}
    for run, times in tables.items():
        cells = []
        for mode in modes:
            if mode not in times:
                cells.append("")
                continue
            change = times[mode] / times["default"] - 1
            slower[mode][0] += 1
            slower[mode][1] += change > 0.01
            cells.append(f"{change:+.1%}")
        rows.append(f"| {run.name} | {times['default']:.2f} | {' | '.join(cells)} |")
    return rows, slower


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args(argv)
    rows, slower = compare(args.runs, args.tokens)
    print("\n".join(rows))
    for mode, (measured, over) in slower.items():
        print(f"{mode}: more than 1% slower than default in {over} of {measured} runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
