"""benchmarks.flux_bench: the CPU smoke run of the diffusion client, and its table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
REPO = Path(__file__).resolve().parents[1]


def test_smoke_run_offloads_both_block_lists_and_matches_the_resident_output(tmp_path):
    command = [sys.executable, "-m", "benchmarks.flux_bench", "--smoke", "--out", str(tmp_path)]
    command += ["--runs", "2"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    resident, offload = json.loads((tmp_path / "results.json").read_text())
    assert (resident["method"], offload["method"]) == ("resident", "offload")
    assert offload["offloaded_layers"] == [
        [f"transformer_blocks.{i}" for i in range(2)]
        + [f"single_transformer_blocks.{i}" for i in range(3)]
    ]
    assert offload["max_rel_diff"] < 1e-4
    assert offload["ms_per_step"] > 0 and offload["bound_ms"] >= offload["copy_floor_ms"]
    assert "offload stalls of transformer_blocks+single_transformer_blocks" in offload["stalls"]
    table = (tmp_path / "results.md").read_text()
    assert "| offload |" in table and "one ring" in table
