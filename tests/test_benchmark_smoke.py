"""The benchmark's CPU smoke mode runs end to end and writes JSON, markdown and a plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.offload_bench import (
    SMOKE,
    GpuLock,
    analyse,
    base_mode,
    markdown,
    mode_flags,
    prepare,
)

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
    """--quiet stops the other workers while one measures (SIGSTOP), which must not hang;
    --both-orders runs the paired cell a second time, its models built in reverse order;
    --reverse-turns and --fresh-memory are named in the rows they change."""
    command = [sys.executable, "-m", "benchmarks.offload_bench", "--smoke", "--paired", "--quiet"]
    command += ["--modes", "default,reduce-overhead", "--configs", "2/1/1", "--hook-configs", ""]
    command += ["--uva", "", "--no-resident", "--both-orders", "--out", str(tmp_path)]
    command += ["--reverse-turns", "--fresh-memory"]
    out = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    cells = json.loads((tmp_path / "results.json").read_text())
    built = sorted((tuple(c["modes"]), c["mode"], c["method"], c["paired"]) for c in cells)
    assert built == [
        (("default", "reduce-overhead"), "default", "offload", True),
        (("default", "reduce-overhead"), "reduce-overhead", "offload", True),
        (("reduce-overhead", "default"), "default", "offload", True),
        (("reduce-overhead", "default"), "reduce-overhead", "offload", True),
    ]
    for cell in cells:  # one worker per order: the same setup, and a time for every turn
        assert [len(r["ms_runs"]) for r in cell["results"]] == [2, 2]
        assert cell["slots"] is None and cell["weights_placement"] is None  # read on CUDA only
        assert cell["reverse_turns"] and cell["fresh_memory"]
        assert [c["setup_s"] for c in cells if c["modes"] == cell["modes"]] == [cell["setup_s"]] * 2
    table = (tmp_path / "results.md").read_text()
    for first in ("default", "reduce-overhead"):
        row = f"| offload 2/1 step 1 paired, {first} first, turns reversed, fresh memory |"
        assert f"{row} reduce-overhead vs default |" in table
    assert "| offload 2/1 step 1 paired | reduce-overhead vs default, mean of 2 build orders |" in (
        table
    )


def test_both_orders_needs_paired_cells(tmp_path):
    command = [sys.executable, "-m", "benchmarks.offload_bench", "--smoke", "--both-orders"]
    command += ["--out", str(tmp_path)]
    out = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2 and "--both-orders needs --paired" in out.stderr


def test_the_mean_of_both_build_orders_cancels_what_the_order_adds():
    """A model built second that runs 4% slower whatever its mode shows as +4% in one order
    and -4% in the other: the mean row of the two orders is the modes' own difference."""
    prefetch = {"offload_group_size": 2, "offload_num_in_group": 1, "offload_prefetch_step": 1}
    runs = {  # (build order, mode) -> runs; reduce-overhead 1% faster, the second model +4%
        ("default", "reduce-overhead"): {"default": [100.0, 100.0], "reduce-overhead": [103.0] * 2},
        ("reduce-overhead", "default"): {"default": [104.0, 104.0], "reduce-overhead": [99.0] * 2},
    }
    cells = [
        _cell("offload", ms, mode=mode, modes=list(order), prefetch=prefetch, paired=True)
        for order, times in runs.items()
        for mode, ms in times.items()
    ]
    for cell in cells:
        cell["copied_bytes_per_forward"] = 0
    rows = markdown(analyse(cells), "cmd").splitlines()
    by_order = [r for r in rows if r.startswith("| offload 2/1 step 1 paired, ") and " vs " in r]
    assert "default first | reduce-overhead vs default | 103.00 vs 100.00 (+3.0%) |" in by_order[0]
    assert "overhead first | reduce-overhead vs default | 99.00 vs 104.00 (-4.8%) |" in by_order[1]
    mean = next(r for r in rows if "mean of 2 build orders" in r)
    assert mean.endswith("| (-0.9%) |")


def test_each_mode_built_first_is_compared_by_its_ratio_to_its_own_bound():
    """Where both build orders ran, each mode is taken from the process that built it first and
    compared by its ratio to its own bound (floors differ between processes): here reduce-
    overhead built first is 2% over its floor of 50 ms, default built first 1% over 100 ms."""
    prefetch = {"offload_group_size": 2, "offload_num_in_group": 1, "offload_prefetch_step": 1}
    runs = {  # (build order, mode) -> (runs, copy floor); the model built second is slower
        ("default", "reduce-overhead"): {"default": (101.0, 100.0), "reduce-overhead": (60, 50)},
        ("reduce-overhead", "default"): {"default": (110.0, 100.0), "reduce-overhead": (51, 50)},
    }
    cells = []
    for order, times in runs.items():
        for mode, (ms, floor) in times.items():
            cell = _cell("offload", [ms, ms], mode=mode, modes=list(order), prefetch=prefetch)
            cells.append(
                {**cell, "paired": True, "copied_bytes_per_forward": 1, "copy_floor_ms": floor}
            )
    rows = markdown(analyse(cells), "cmd").splitlines()
    (first,) = [r for r in rows if "each built first" in r]
    assert first.endswith("| 1.020 vs 1.010 (+1.0%) |")
    assert "| reduce-overhead vs default, each built first (ratio to its bound) |" in first


def test_the_table_tells_where_each_models_memory_went():
    """A model placed into reused segments and one placed into new ones get their own rows,
    with the slot buffers of all their runtimes summed; a model with no record gets none."""
    prefetch = {"offload_group_size": 2, "offload_num_in_group": 1, "offload_prefetch_step": 1}
    slots = [{"buffers": 9, "alone_in_segment": 5}, {"buffers": 2, "alone_in_segment": 0}]
    common = {"prefetch": prefetch, "paired": True, "copied_bytes_per_forward": 0}
    common["modes"] = ["default", "reduce-overhead"]
    placed = {"recycled_bytes": 0, "fresh_bytes": 1_750_000_000}
    first = _cell("offload", [1.0], weights_placement=placed, slots=slots, **common)
    placed = {"recycled_bytes": 1_740_000_000, "fresh_bytes": 10_000_000}
    second = _cell("offload", [1.0], mode="reduce-overhead", weights_placement=placed, **common)
    unrecorded = _cell("resident", [1.0], copied_bytes_per_forward=0)
    rows = markdown(analyse([first, second, unrecorded]), "cmd").splitlines()
    start = next(i for i, r in enumerate(rows) if r.startswith("| method | mode | weights into"))
    assert rows[start + 2 : start + 4] == [
        "| offload 2/1 step 1 paired, default first | default | 0 | 1750 | 11 | 5 |",
        "| offload 2/1 step 1 paired, default first | reduce-overhead | 1740 | 10 |  |  |",
    ]
    assert len(rows) == start + 4 or not rows[start + 4].startswith("| resident")


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


def test_the_bound_uses_a_cells_copy_floor_over_the_bandwidth_probe():
    """A probe of 46 GB/s during interference must not put a cell below its bound."""
    resident = _cell("resident", [10.0, 10.0, 10.0], copied_bytes_per_forward=0)
    spec = {"copied_bytes_per_forward": 1_000_000_000, "cell_h2d_GBps": 46.0}
    prefetch = {"offload_group_size": 2, "offload_num_in_group": 1, "offload_prefetch_step": 1}
    with_floor = _cell("offload", [20.0] * 3, prefetch=prefetch, copy_floor_ms=18.2, **spec)
    probe_only = _cell("offload", [20.0] * 3, prefetch=prefetch, **spec)
    analyse([resident, with_floor, probe_only])
    assert with_floor["results"][0]["bound_ms"] == 18.2
    assert round(probe_only["results"][0]["bound_ms"], 3) == round(1e9 / 46e6, 3)
    assert resident["results"][0]["ratio"] == 1.0


def test_the_table_flags_cells_whose_runs_spread_beyond_five_percent():
    prefetch = {"offload_group_size": 2, "offload_num_in_group": 1, "offload_prefetch_step": 1}
    spec = {"copied_bytes_per_forward": 0, "prefetch": prefetch}
    steady = _cell("offload", [100.0, 101.0, 102.0], **spec)
    noisy = _cell("hook", [100.0, 101.0, 112.0], **spec)
    table = markdown(analyse([steady, noisy]), "cmd")
    times = [line for line in table.splitlines() if line.startswith("| ") and "101.00" in line]
    assert len(times) == 2  # the step-time rows (the memory table follows)
    assert times[0].startswith("| offload 2/1 step 1 |") and "†" not in times[0]
    assert times[1].startswith("| hook 2/1 step 1 |") and times[1].endswith("101.00 † |")


def test_a_paired_cell_with_several_models_per_mode_compares_the_modes_means():
    """Two models of one mode differ by more than two modes can: the row that compares the
    modes averages each mode's models turn by turn."""
    prefetch = {"offload_group_size": 2, "offload_num_in_group": 1, "offload_prefetch_step": 2}
    spec = {"copied_bytes_per_forward": 0, "prefetch": prefetch, "paired": True}
    runs = {
        "default": [100.0, 110.0],
        "default.2": [102.0, 112.2],
        "reduce-overhead": [103.0, 113.3],
        "reduce-overhead.2": [101.0, 111.1],
    }
    cells = [_cell("offload", ms, **spec, mode=mode) for mode, ms in runs.items()]
    table = markdown(analyse(cells), "cmd")
    row = next(line for line in table.splitlines() if "(2 models)" in line)
    assert row.startswith("| offload 2/1 step 2 paired | reduce-overhead (2 models) vs default")
    assert row.endswith("(+1.0%) |")


def test_profile_summary_counts_copies_gaps_memsets_and_kernels_per_call():
    """profile_offload.summarise on a made-up trace of two calls: copies, the gap between two
    copies with the kernel inside it, memsets (left out of the kernels) and kernel names."""
    from types import SimpleNamespace

    from benchmarks.profile_offload import summarise

    def event(name: str, start: float, end: float) -> SimpleNamespace:  # times in µs
        return SimpleNamespace(
            name=name,
            device_type=torch.autograd.DeviceType.CUDA,
            device_index=0,
            time_range=SimpleNamespace(start=start, end=end),
        )

    copy = "Memcpy HtoD (Pinned -> Device)"
    trace = [
        event(copy, 0, 1000),
        event("Memset (Device)", 1000, 1002),
        event("gemv_splitK", 1100, 1400),
        event(copy, 1500, 2500),  # 500 µs after the first copy, the gemv ran in between
        event("gemv_splitK", 2600, 2700),
        event("rmsnorm", 2700, 2710),
    ]
    summary = summarise(SimpleNamespace(events=lambda: trace), calls=2)
    assert summary["copy_count_per_call"] == 1.0
    assert summary["copy_busy_ms_per_call"] == 1.0
    assert summary["copy_idle_ms_per_call"] == 0.25
    assert summary["copy_idle_largest"][0]["kernels"] == ["gemv_splitK"]
    assert summary["memset_count_per_call"] == 0.5
    assert summary["kernel_names_most_run"] == [("gemv_splitK", 2), ("rmsnorm", 1)]
    assert summary["kernel_count_per_call"] == 1.5


def test_host_side_matches_launches_to_device_work_by_correlation():
    """profile_offload.host_side on a made-up Chrome trace of two calls: a copy the device
    started 500 µs after its issue, one it started at once after the copy engine idled 300 µs
    (the host was late), a graph launch, and a synchronizing runtime call."""
    from benchmarks.profile_offload import host_side

    def x(cat: str, name: str, ts: float, dur: float, correlation: int) -> dict:
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur,
                "args": {"correlation": correlation}}  # fmt: skip

    copy = "Memcpy HtoD (Pinned -> Device)"
    trace = {
        "traceEvents": [
            x("cuda_runtime", "cudaMemcpyAsync", 0, 10, 1),
            x("gpu_memcpy", copy, 510, 1000, 1),  # issued at 10, started 500 later
            x("cuda_runtime", "cudaGraphLaunch", 20, 30, 2),
            x("kernel", "spin", 1050, 5, 2),
            x("kernel", "mm", 1100, 200, 2),
            x("cuda_runtime", "cudaMemcpyAsync", 1795, 10, 3),
            x("gpu_memcpy", copy, 1810, 1000, 3),  # 5 µs after its issue; idle 300 before
            x("cuda_runtime", "cudaStreamSynchronize", 1900, 1000, 4),
            {"ph": "i", "cat": "cuda_runtime", "name": "marker", "ts": 0},
        ]
    }
    host = host_side(trace, calls=2)
    leads = host["device_start_after_issue_ms"]
    assert leads["cudaMemcpyAsync"]["n"] == 2
    assert leads["cudaMemcpyAsync"]["min"] == pytest.approx(0.005)
    assert leads["cudaMemcpyAsync"]["max"] == pytest.approx(0.5)
    assert leads["cudaGraphLaunch"] == {
        "n": 1, "min": 1.0, "p10": 1.0, "median": 1.0, "max": 1.0
    }  # fmt: skip
    assert host["copies_started_on_issue_per_call"] == 0.5
    assert host["copy_idle_before_late_copies_ms_per_call"] == pytest.approx(0.15)
    assert host["runtime_calls_ms_per_call"][0] == {
        "name": "cudaStreamSynchronize", "count": 0.5, "ms": 0.5
    }  # fmt: skip


def test_restore_counter_counts_the_counters_state_restores():
    import logging

    from benchmarks.profile_offload import RestoreCounter

    counter = RestoreCounter().install()
    log = logging.getLogger("offload_compiler.counters")
    try:
        log.debug("offload: entity %d holds %s, the graph starts from %s", 3, 1, 0)
        log.debug("offload: something else")
        log.debug("offload: entity %d holds %s, the graph starts from %s", 4, None, 2)
        assert counter.count == 2
    finally:
        log.removeHandler(counter)
        log.setLevel(logging.NOTSET)


@pytest.mark.parametrize(
    ("variants", "why"),
    [
        # a captured replay leaves the slots without telling the runtime: default would read
        # a stale one
        ("reduce-overhead,default --captured-copies", "need default+rejoin"),
        ("default+rejoin+graph,default --captured-copies", "need default+rejoin"),
        ("reduce-overhead+replay,default+rejoin,default", "needs reduce-overhead[.N]"),
        ("reduce-overhead,reduce-overhead.3+nocopy,default+rejoin,default", "needs reduce"),
        ("reduce-overhead,default+rejoin", "with default"),
        # with host copies only the backend's call of a graph issues its copies
        ("reduce-overhead,reduce-overhead+replay,default+rejoin,default", "--captured-copies"),
        ("default+rejoin+graph,default+rejoin,default", "--captured-copies"),
    ],
)
def test_mode_turns_refuses_variant_sets_that_cannot_take_turns(tmp_path, capsys, variants, why):
    from benchmarks import mode_turns

    with pytest.raises(SystemExit) as exit_:
        mode_turns.main(["--out", str(tmp_path), "--variants", *variants.split()])
    assert exit_.value.code == 2
    assert why in capsys.readouterr().err


@pytest.mark.parametrize(
    "variants",
    [
        "reduce-overhead,default+rejoin,default --captured-copies",
        # host copies: every call of the backend's graphs keeps the runtime's bookkeeping exact
        "reduce-overhead,reduce-overhead.2,default",
    ],
)
def test_mode_turns_accepts_a_safe_variant_set_up_to_the_device(tmp_path, variants):
    """A safe set passes the checks and gets as far as asking for the GPU (none on CI)."""
    from benchmarks import mode_turns

    if torch.cuda.is_available():
        pytest.skip("would run the benchmark")
    with pytest.raises((RuntimeError, AssertionError), match=r"(?i)cuda|nvidia|torch not compiled"):
        mode_turns.main(["--out", str(tmp_path), "--variants", *variants.split()])


def test_mode_flags_split_from_the_inductor_mode():
    assert base_mode("reduce-overhead+static+captured.2") == "reduce-overhead"
    assert mode_flags("reduce-overhead+static+captured.2") == {"static", "captured"}
    assert mode_flags("default.3") == set()
    with pytest.raises(ValueError, match="unknown flags \\['statik'\\]"):
        mode_flags("default+statik")


@pytest.mark.parametrize(("mode", "graphs"), [("default", 2), ("default+static", 3)])
def test_a_static_mode_compiles_every_token_count_on_its_own(tmp_path, mode, graphs):
    """Without the flag the second token count compiles one graph of dynamic shape that
    serves the third; with it each token count is a graph of its own."""
    from torch._dynamo.utils import counters

    spec = {"method": "offload", "mode": mode, "shape": SMOKE, "layers": 4, "tokens": [4]}
    spec["prefetch"] = {"offload_group_size": 2, "offload_num_in_group": 1}
    torch._dynamo.reset()
    counters.clear()
    lock = GpuLock(tmp_path / "gpu.lock")  # one process: the lock is always free
    call, moved, _ = prepare(spec, torch.device("cpu"), torch.float32, lock)
    assert moved > 0
    with torch.no_grad():
        for tokens in (4, 16, 9):
            assert call(torch.randint(0, SMOKE["vocab"], (1, tokens))).shape[1] == tokens
    assert counters["stats"]["unique_graphs"] == graphs


def test_the_rehoming_flags_parse_and_refuse_a_runtime_without_host_copies():
    """+hugepages/+repinned are mode flags; moving host copies after recording is refused for
    a runtime whose CUDA graphs (if any) would hold the copies, as every CPU runtime's."""
    from benchmarks import pinned_pages
    from offload_compiler.config import PrefetchOffloadConfig
    from offload_compiler.planning import plan_prefetch
    from offload_compiler.runtime import OffloadRuntime
    from tests.models import MLPStack

    assert mode_flags("reduce-overhead+hugepages") == {"hugepages"}
    assert mode_flags("reduce-overhead+repinned.2") == {"repinned"}
    model = MLPStack()
    plan = plan_prefetch(
        model.blocks, "blocks", PrefetchOffloadConfig(offload_group_size=2), shared=set()
    )
    runtime = OffloadRuntime(0, model.blocks, plan, torch.device("cpu"), "h", False)
    assert pinned_pages.rehome_as_flagged(runtime, set()) is None
    with pytest.raises(ValueError, match="only a runtime with host copies"):
        pinned_pages.rehome_as_flagged(runtime, {"repinned"})


def test_huge_page_share_reads_the_mappings_of_the_tensors():
    from benchmarks import pinned_pages

    touched = torch.ones(8 << 20, dtype=torch.uint8)
    share = pinned_pages.huge_page_share([touched])
    assert share["rss_kB"] >= 8 << 10
    assert "[anon]" in share["mappings"]
    assert pinned_pages.transparent_huge_pages().keys() == {"enabled", "defrag"}


def test_compare_profiles_tabulates_modes_against_each_runs_default(tmp_path):
    from benchmarks.compare_profiles import compare

    def run(name: str, times: dict[str, float]) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for mode, ms in times.items():
            (folder / f"{mode}-2048.json").write_text(json.dumps({"mode": mode, "ms": ms}))
            (folder / f"{mode}-16.json").write_text(json.dumps({"mode": mode, "ms": 1.0}))
        return folder

    first = run("one", {"default": 32.0, "reduce-overhead": 34.0, "reduce-overhead.2": 32.1})
    second = run("two", {"default": 33.0, "reduce-overhead": 33.0})
    rows, slower = compare([first, second], 2048)
    assert rows[0] == "| run | default ms | reduce-overhead | reduce-overhead.2 |"
    assert rows[2] == "| one | 32.00 | +6.2% | +0.3% |"
    assert rows[3] == "| two | 33.00 | +0.0% |  |"
    assert slower == {"reduce-overhead": [2, 1], "reduce-overhead.2": [1, 0]}
    with pytest.raises(ValueError, match="no default-mode summary"):
        compare([run("three", {"reduce-overhead": 30.0})], 2048)


def test_copies_beside_groups_copies_by_the_kernels_that_ran_with_them():
    """A copy beside an offloaded layer's matmul (a spin before it), one beside a resident
    layer's matmul, one beside a spin alone, and one small copy left out."""
    from benchmarks.copy_neighbours import copies_beside, label_kernels

    def x(cat: str, name: str, ts: float, dur: float, nbytes: int = 0) -> dict:
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur,
                "args": {"bytes": nbytes}}  # fmt: skip

    copy = "Memcpy HtoD (Pinned -> Device)"
    kernels = [
        x("kernel", "mm", 0, 1000),  # resident: no marker within two kernels
        x("kernel", "norm", 1000, 10),
        x("kernel", "add", 1010, 10),
        x("kernel", "spin", 1020, 10),
        x("kernel", "mm", 1030, 1000),  # offloaded: a spin just before
        x("kernel", "bump", 2030, 1),
        x("kernel", "spin", 2031, 2000),
    ]
    events = [
        *kernels,
        x("gpu_memcpy", copy, 0, 1000, 50_000_000),  # 50 GB/s beside the resident mm
        x("gpu_memcpy", copy, 1030, 1000, 40_000_000),  # 40 GB/s beside the offloaded mm
        x("gpu_memcpy", copy, 2031, 2000, 110_000_000),  # 55 GB/s beside the spin
        x("gpu_memcpy", copy, 2031, 10, 8192),  # too small to count
    ]
    assert label_kernels(kernels) == [
        "resident", "offloaded", "offloaded", "spin", "offloaded", "bump", "spin"
    ]  # fmt: skip
    assert copies_beside(events) == {
        "offloaded": {"copies": 1, "median_GBps": 40.0},
        "resident": {"copies": 1, "median_GBps": 50.0},
        "spin": {"copies": 1, "median_GBps": 55.0},
    }


def test_blocks_since_splits_new_blocks_into_reused_and_new_segments():
    """A block placed in a segment the first snapshot had counts as recycled, one in a segment
    it lacked as fresh; blocks live in both snapshots, and freed ones, count as neither."""
    from benchmarks.slot_placement import blocks_since

    def segment(address: int, *blocks: tuple[int, int, str]) -> dict:
        return {
            "address": address,
            "total_size": 1 << 20,
            "blocks": [{"address": a, "size": n, "state": state} for a, n, state in blocks],
        }

    live, free = "active_allocated", "inactive"
    before = [segment(0, (0, 100, live), (100, 900, free))]
    after = [
        segment(0, (0, 100, live), (100, 300, live), (400, 600, free)),
        segment(1 << 20, ((1 << 20), 5000, live), ((1 << 20) + 5000, 7, free)),
    ]
    assert blocks_since(before, after) == {"blocks": 2, "recycled_bytes": 300, "fresh_bytes": 5000}


def test_slot_placement_finds_each_buffers_segment_and_neighbours():
    """Two slot buffers share one allocator segment with a third live block, one has a
    segment of its own."""
    from benchmarks.slot_placement import HUGE, placement

    shared = torch.empty(3 * 4096, dtype=torch.uint8)
    first, second, neighbour = shared[:4096], shared[4096:8192], shared[8192:]
    alone = torch.empty(4096, dtype=torch.uint8)
    base = shared.data_ptr()

    def block(t: torch.Tensor) -> dict:
        return {"address": t.data_ptr(), "size": t.numel(), "state": "active_allocated"}

    segments = [
        {
            "address": base,
            "total_size": 3 * 4096,
            "stream": 0,
            "segment_pool_id": (0, 0),
            "blocks": [block(first), block(second), block(neighbour)],
        },
        {"address": alone.data_ptr(), "total_size": 4096, "stream": 7, "blocks": [block(alone)]},
    ]
    where = placement([first[:16], second, alone], segments)
    assert (where["buffers"], where["segments"], where["alone_in_segment"]) == (3, 2, 1)
    assert where["on_2MiB_boundary"] == sum(
        p % HUGE == 0 for p in (base, base + 4096, alone.data_ptr())
    )
    a, b, c = where["by_buffer"]
    assert a["nbytes"] == 3 * 4096  # a view's storage: the whole buffer it is part of
    assert (a["offset_in_segment"], a["other_live_blocks"], a["other_live_bytes"]) == (0, 2, 8192)
    assert (b["offset_in_segment"], b["offset_from_2MiB"]) == (4096, (base + 4096) % HUGE)
    assert (c["other_live_blocks"], c["segment_stream"], c["segment_pool"]) == (0, 7, [])
    with pytest.raises(ValueError, match="no allocator segment"):
        placement([torch.empty(8)], segments)
