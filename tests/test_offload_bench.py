"""benchmarks.offload_bench: the CPU smoke run end to end, --merge, the bound and the table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import offload_bench
from benchmarks.offload_bench import SMOKE, analyse, build_model, markdown, prepare, uva_bytes

REPO = Path(__file__).resolve().parents[1]
PREFETCH = {"offload_group_size": 2, "offload_num_in_group": 1, "offload_prefetch_step": 1}


def _bench(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "benchmarks.offload_bench", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=timeout)


def _step_rows(table: str) -> list[str]:
    """The rows of the step-time table (the first table of results.md)."""
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method | mode | copied"))
    end = lines.index("", start)
    return lines[start + 2 : end]


def test_smoke_run_writes_its_three_outputs_and_merges_again(tmp_path):
    run, merged = tmp_path / "run", tmp_path / "merged"
    out = _bench("--smoke", "--out", str(run))
    assert out.returncode == 0, out.stderr[-3000:]
    cells = json.loads((run / "results.json").read_text())
    assert not [c for c in cells if c.get("error")], [c["error"] for c in cells if "error" in c]
    methods = sorted(c["method"] for c in cells)
    assert methods == ["hook", "offload", "offload", "offload", "resident", "uva"]
    for cell in cells:
        assert [r["tokens"] for r in cell["results"]] == [4, 16]
        assert all(r["ms"] > 0 and len(r["ms_runs"]) == 2 for r in cell["results"])
        assert all(r["ratio"] is not None for r in cell["results"])
    for cell in cells:  # the offloaded methods copy, and time their own copies' floor
        copies = cell["method"] in ("offload", "hook")
        assert (cell["copied_bytes_per_forward"] > 0) == (cell["method"] != "resident")
        assert (cell["copy_floor_ms"] is not None) == copies
    table = (run / "results.md").read_text()
    assert "| offload 2/1 step 2 | default |" in table
    assert "| offload 2/1 step 1 per-param | default |" in table
    assert (run / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    out = _bench("--merge", str(run), "--out", str(merged), timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    again = json.loads((merged / "results.json").read_text())
    assert [c["run"] for c in again] == ["run"] * len(cells)
    assert [c["results"] for c in again] == [c["results"] for c in cells]
    assert _step_rows((merged / "results.md").read_text()) == _step_rows(table)
    assert f"--merge {run} --out {merged}" in (merged / "results.md").read_text()


def _cell(method: str, ms: list[float], **extra) -> dict:
    """A cell as a worker reports it (one token count), with runs ``ms``."""
    result = {"tokens": 1, "ms": sorted(ms)[len(ms) // 2], "ms_runs": ms, "peak_bytes": 0}
    return {
        "method": method,
        "mode": "default",
        "tokens": [1],
        "resident_bytes_after_setup": 0,
        "results": [result],
        **extra,
    }


def test_merge_takes_each_runs_bandwidth_and_a_merged_grid_merges_unchanged(tmp_path):
    """Two runs as earlier versions wrote them (a bandwidth cell, no copy floor, no runs):
    each offload cell's bound is its bytes over its own run's probe; the merged grid, merged
    again, keeps each cell's run and bandwidth."""
    runs = {"a": 50.0, "b": 40.0}
    for name, gbps in runs.items():
        (tmp_path / name).mkdir()
        offload = _cell("offload", [30.0], prefetch=PREFETCH, copied_bytes_per_forward=10**9)
        del offload["results"][0]["ms_runs"]
        resident = _cell("resident", [10.0], copied_bytes_per_forward=0)
        cells = [{"method": "bandwidth", "h2d_GBps": gbps}, resident, offload]
        (tmp_path / name / "results.json").write_text(json.dumps(cells))
    first = tmp_path / "first"
    runs_dirs = [str(tmp_path / name) for name in runs]
    assert offload_bench.main(["--merge", *runs_dirs, "--out", str(first)]) == 0
    merged = json.loads((first / "results.json").read_text())
    bounds = {c["run"]: c["results"][0]["bound_ms"] for c in merged if c["method"] == "offload"}
    assert bounds == pytest.approx({"a": 20.0, "b": 25.0})
    assert "Measured H2D bandwidth: 40.0-50.0 GB/s" in (first / "results.md").read_text()
    second = tmp_path / "second"
    assert offload_bench.main(["--merge", str(first), "--out", str(second)]) == 0
    again = json.loads((second / "results.json").read_text())
    assert [(c["run"], c["run_h2d_GBps"]) for c in again] == [
        (c["run"], c["run_h2d_GBps"]) for c in merged
    ]
    assert _step_rows((second / "results.md").read_text()) == _step_rows(
        (first / "results.md").read_text()
    )


def test_the_bound_uses_a_cells_copy_floor_over_the_bandwidth_probe():
    """A probe of 46 GB/s during interference must not put a cell below its bound."""
    resident = _cell("resident", [10.0, 10.0, 10.0], copied_bytes_per_forward=0)
    spec = {"copied_bytes_per_forward": 1_000_000_000, "cell_h2d_GBps": 46.0}
    with_floor = _cell("offload", [20.0] * 3, prefetch=PREFETCH, copy_floor_ms=18.2, **spec)
    probe_only = _cell("offload", [20.0] * 3, prefetch=PREFETCH, **spec)
    analyse([resident, with_floor, probe_only])
    assert with_floor["results"][0]["bound_ms"] == 18.2
    assert round(probe_only["results"][0]["bound_ms"], 3) == round(1e9 / 46e6, 3)
    assert resident["results"][0]["ratio"] == 1.0


def test_the_bound_takes_compute_from_the_resident_cell_of_the_same_mode():
    default = _cell("resident", [10.0], copied_bytes_per_forward=0)
    graphs = _cell("resident", [6.0], mode="reduce-overhead", copied_bytes_per_forward=0)
    spec = {"prefetch": PREFETCH, "copied_bytes_per_forward": 10**6, "copy_floor_ms": 1.0}
    offload = _cell("offload", [7.0], mode="reduce-overhead", **spec)
    peer = _cell("accelerate", [30.0], mode="eager", **spec)  # no eager resident: default's
    analyse([default, graphs, offload, peer])
    assert offload["results"][0]["bound_ms"] == 6.0
    assert peer["results"][0]["bound_ms"] == 10.0


def test_the_table_flags_cells_whose_runs_spread_beyond_five_percent():
    spec = {"copied_bytes_per_forward": 0, "prefetch": PREFETCH}
    steady = _cell("offload", [100.0, 101.0, 102.0], **spec)
    noisy = _cell("hook", [100.0, 101.0, 112.0], **spec)
    rows = _step_rows(markdown(analyse([steady, noisy]), "cmd"))
    assert len(rows) == 2
    assert rows[0].startswith("| offload 2/1 step 1 |") and "†" not in rows[0]
    assert rows[1].startswith("| hook 2/1 step 1 |") and rows[1].endswith("101.00 † |")


def test_the_table_lists_failed_cells():
    failed = {"method": "offload", "mode": "default", "prefetch": PREFETCH, "error": "OOM"}
    table = markdown(analyse([_cell("resident", [1.0], copied_bytes_per_forward=0), failed]), "c")
    assert "- offload 2/1 step 1 (default): OOM" in table


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--modes", "default+static"], "unknown modes ['default+static']"),
        (["--modes", "reduce-overhead.2"], "unknown modes"),
        (["--configs", "2/1/1:fast"], "unknown suffix :fast"),
        (["--paired"], "unrecognized arguments: --paired"),
    ],
)
def test_the_command_line_refuses_what_it_does_not_measure(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        offload_bench.main(["--smoke", "--out", str(tmp_path), *args])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_configs_parse_into_prefetch_options():
    assert offload_bench.parse_configs("2/1/1:pp,1/1/2,4/1/1:layer") == [
        {**PREFETCH, "offload_per_param": True},
        {"offload_group_size": 1, "offload_num_in_group": 1, "offload_prefetch_step": 2},
        {"offload_group_size": 4, "offload_num_in_group": 1, "offload_prefetch_step": 1,
         "offload_per_param": False},
    ]  # fmt: skip


def test_an_offload_cell_copies_what_the_package_says_it_offloaded():
    """On the CPU: the bytes and host tensors of the cell's copies, read after the first
    call from `offload_compiler.offloaded_stacks`, are the parameters of layers 1 and 3."""
    spec = {"method": "offload", "shape": SMOKE, "layers": 4, "tokens": [4]}
    spec.update(prefetch=PREFETCH, transformers=False)
    prepared = prepare(spec, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        logits = prepared.call(torch.randint(0, SMOKE["vocab"], (1, 4)))
    assert logits.shape == (1, 4, SMOKE["vocab"])
    moved, hosts = prepared.copies()
    reference = build_model(spec, torch.device("cpu"), torch.float32)
    expected = [p for i in (1, 3) for p in reference.layers[i].parameters()]
    assert moved == sum(p.nbytes for p in expected)
    assert sorted(h.shape for h in hosts) == sorted(p.shape for p in expected)


def test_uva_bytes_fill_the_budget_in_model_order_the_last_crossing_it():
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    weight = 256 * 256 * 4
    assert uva_bytes(model, 0) == 0
    assert uva_bytes(model, weight / 2**30) == weight
    assert uva_bytes(model, (weight + 1) / 2**30) == weight + 256 * 4
    assert uva_bytes(model, 1.0) == sum(p.nbytes for p in model.parameters())
