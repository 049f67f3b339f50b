"""The benchmark's CPU smoke mode runs end to end and writes JSON, markdown and a plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_smoke_benchmark_writes_its_three_outputs(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.offload_bench", "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    cells = json.loads((tmp_path / "results.json").read_text())
    assert not [c for c in cells if c.get("error")], [c["error"] for c in cells if "error" in c]
    methods = {c["method"] for c in cells}
    assert methods == {"resident", "offload", "hook", "uva"}
    for cell in cells:
        assert [r["tokens"] for r in cell["results"]] == [4, 16]
        assert all(r["ms"] > 0 and r["ratio"] is not None for r in cell["results"])
    offloaded = [c for c in cells if c["method"] == "offload"]
    assert all(c["copied_bytes_per_forward"] > 0 for c in offloaded)
    table = (tmp_path / "results.md").read_text()
    assert "| offload 2/1 step 2 | default |" in table
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paired_cells_time_their_modes_in_turns_in_one_process(tmp_path):
    """--quiet stops the other workers while one measures (SIGSTOP), which must not hang."""
    command = [sys.executable, "-m", "benchmarks.offload_bench", "--smoke", "--paired", "--quiet"]
    command += ["--modes", "default,reduce-overhead", "--configs", "2/1/1", "--hook-configs", ""]
    command += ["--uva", "", "--no-resident", "--out", str(tmp_path)]
    out = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    cells = json.loads((tmp_path / "results.json").read_text())
    assert [(c["method"], c["mode"], c["paired"]) for c in cells] == [
        ("offload", "default", True),
        ("offload", "reduce-overhead", True),
    ]
    for cell in cells:  # one worker: the same setup, and a time for every turn
        assert [len(r["ms_runs"]) for r in cell["results"]] == [2, 2]
        assert cell["setup_s"] == cells[0]["setup_s"]
    table = (tmp_path / "results.md").read_text()
    assert "| offload 2/1 step 1 paired | reduce-overhead vs default |" in table
