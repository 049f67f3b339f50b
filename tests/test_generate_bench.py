"""benchmarks.generate_bench: the CPU smoke run of the whole journey, and its table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.generate_bench import markdown

pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[1]


def test_smoke_run_writes_a_checkpoint_generates_and_matches_the_resident_tokens(tmp_path):
    out, checkpoint = tmp_path / "out", tmp_path / "checkpoint"
    command = [sys.executable, "-m", "benchmarks.generate_bench", "--smoke", "--out", str(out)]
    command += ["--checkpoint", str(checkpoint)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (checkpoint / "model.safetensors.index.json").is_file()
    results = json.loads((out / "results.json").read_text())
    runs = [(r["phase"], r.get("path")) for r in results]
    assert runs == [
        ("write", None),
        ("resident", "hand"),
        ("offload", "hand"),
        ("resident", "generate"),
        ("offload", "generate"),
    ]
    for resident, offload in ((results[1], results[2]), (results[3], results[4])):
        assert len(offload["tokens"]) == offload["new"]
        assert offload["tokens"] == resident["tokens"]
        assert offload["offloaded_layers"] == [[1, 3]]
        assert offload["prefill_ms"] > 0 and offload["decode_ms"] > 0
    table = (out / "results.md").read_text()
    assert table.count("| yes (6) |") == 2


def test_the_table_says_no_where_the_tokens_differ_and_names_a_failed_run():
    spec = {
        "device_name": "cpu",
        "torch": "x",
        "shape": {"num_hidden_layers": 4, "hidden_size": 64},
        "dtype": "float32",
        "prompt": 8,
        "new": 3,
        "peer_new": 2,
        "path": "hand",
        "mode": "default",
    }
    timing = {"prefill_ms": 1.0, "decode_ms": 2.0}
    results = [
        {**spec, **timing, "phase": "resident", "tokens": [1, 2, 3]},
        {**spec, **timing, "phase": "offload", "tokens": [1, 2, 4], "bound_ms": 1.0},
        {**spec, "phase": "accelerate", "error": "exit 1: MemoryError: no room"},
    ]
    table = markdown(results, "cmd")
    assert "| NO (3) |" in table and "| 2.000 |" in table
    assert "error: exit 1: MemoryError: no room" in table
