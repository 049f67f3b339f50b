"""benchmarks.timing on the CPU: back-to-back calls between syncs, turns, the copy floor."""

from __future__ import annotations

import itertools
import math
import statistics
import time

import pytest
import torch

from benchmarks.timing import copy_floor_ms, h2d_gbps, time_calls, wall_ms

CPU = torch.device("cpu")


def test_wall_ms_is_the_time_per_call_of_back_to_back_calls():
    calls = []

    def sleep_2ms() -> None:
        calls.append(1)
        time.sleep(0.002)

    ms = wall_ms(sleep_2ms, CPU, count=5)
    assert len(calls) == 5
    assert 2.0 <= ms < 200.0


def test_time_calls_takes_turns_and_runs_each_for_at_least_min_run_s():
    """One untimed call of each to size its runs, then the callables alternate run by run;
    a run of a 2 ms call lasting at least 20 ms holds at least 10 calls."""
    log: list[str] = []

    def call(name: str, seconds: float):
        def run() -> None:
            log.append(name)
            time.sleep(seconds)

        return run

    times = time_calls({"fast": call("fast", 0.002), "slow": call("slow", 0.004)}, CPU, 3, 0.02)
    assert [len(times["fast"]), len(times["slow"])] == [3, 3]
    assert statistics.median(times["slow"]) > statistics.median(times["fast"])
    blocks = [(name, len(list(group))) for name, group in itertools.groupby(log)]
    assert [name for name, _ in blocks] == ["fast", "slow"] * 4
    assert blocks[:2] == [("fast", 1), ("slow", 1)]
    assert all(count >= 3 for _, count in blocks[2:])
    assert all(count >= 10 for name, count in blocks[2:] if name == "fast")


def test_copy_floor_copies_host_tensors_of_any_dtype_and_shape():
    hosts = [
        torch.ones(1 << 20),
        torch.ones(300, 7, dtype=torch.bfloat16),
        torch.ones(64, 64).t(),  # not contiguous
    ]
    floor = copy_floor_ms(hosts, CPU)
    assert 0 < floor < 1000
    with pytest.raises(ValueError, match="no host tensors"):
        copy_floor_ms([], CPU)


def test_copy_floor_grows_with_the_bytes_copied():
    small = copy_floor_ms([torch.ones(1 << 16)], CPU, repeats=5)  # 256 KiB
    large = copy_floor_ms([torch.ones(1 << 20) for _ in range(32)], CPU, repeats=5)  # 128 MiB
    assert large > small


def test_h2d_gbps_is_bytes_over_the_floor_of_one_buffer():
    gbps = h2d_gbps(CPU, 64 * 2**20)
    assert math.isfinite(gbps) and 0.1 < gbps < 10_000
