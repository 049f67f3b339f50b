"""benchmarks.profile_offload: what it reads from a profile, on made-up traces."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from benchmarks import profile_offload
from benchmarks.profile_offload import host_side, summarise


def test_profile_summary_counts_copies_gaps_memsets_and_kernels_per_call():
    """profile_offload.summarise on a made-up trace of two calls: copies, the gap between two
    copies with the kernel inside it, memsets (left out of the kernels) and kernel names."""

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


@pytest.mark.skipif(torch.cuda.is_available(), reason="would profile the GPU")
def test_it_refuses_to_run_without_a_cuda_device(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        profile_offload.main(["--out", str(tmp_path), "--modes", "default"])
    assert exit_.value.code == 2
    assert "none is available" in capsys.readouterr().err


def test_it_takes_plain_inductor_modes_only(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        profile_offload.main(["--out", str(tmp_path), "--modes", "default+rejoin"])
    assert exit_.value.code == 2
    assert "unknown modes ['default+rejoin']" in capsys.readouterr().err
