"""The schedule: each choice that depends on several options, the mode and the device."""

from __future__ import annotations

import logging

import pytest
import torch

from offload_compiler import OffloadConfig
from offload_compiler import schedule as schedule_module
from offload_compiler.schedule import resolve
from tests.common import prefetch_options

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")


@pytest.fixture
def counters_work(monkeypatch):
    """A CUDA device whose driver and Triton offer what host-issued copies need."""
    monkeypatch.setattr(schedule_module, "counters_available", lambda device: None)


def _resolve(device: torch.device, mode: str | None = None, **prefetch) -> schedule_module.Schedule:
    options = prefetch_options(2, 1, 1)
    options["prefetch"].update(prefetch)
    if mode is not None:
        options["mode"] = mode
    return resolve(OffloadConfig.from_options(options), None, device)


@pytest.mark.parametrize(
    ("device", "mode", "prefetch", "expected"),
    [
        # (counter_ordering, host_issued_copies, rejoin, graph_partition off)
        (CUDA, None, {}, (True, False, False, False)),
        (CUDA, "reduce-overhead", {}, (True, True, False, True)),
        (CUDA, "reduce-overhead", {"offload_host_copies": False}, (False, False, True, False)),
        (CUDA, None, {"offload_capturable": True}, (False, False, True, False)),
        (CUDA, "reduce-overhead", {"offload_capturable": True}, (False, False, True, False)),
        (CPU, None, {}, (False, False, False, False)),
        (CPU, "reduce-overhead", {}, (False, False, True, False)),
    ],
)
def test_copies_ordering_and_rejoin_follow_mode_options_and_device(
    counters_work, device, mode, prefetch, expected
):
    schedule = _resolve(device, mode, **prefetch)
    partition_off = schedule.inductor_patches.get("graph_partition") is False
    got = (schedule.counter_ordering, schedule.host_issued_copies, schedule.rejoin, partition_off)
    assert got == expected
    assert schedule.cudagraphs == (mode == "reduce-overhead")
    assert schedule.staged_inputs == (mode == "reduce-overhead" and device.type == "cuda")


def test_one_model_in_two_modes_shares_the_runtime_ordering(counters_work):
    """Both modes' schedules order copies by counters, so one runtime serves both compiles."""
    default, graphs = _resolve(CUDA), _resolve(CUDA, "reduce-overhead")
    assert default.counter_ordering and graphs.counter_ordering
    assert default.config_hash != graphs.config_hash  # the mode is part of the config


def test_without_counters_copies_stay_in_the_graphs_and_say_why(monkeypatch, caplog):
    monkeypatch.setattr(schedule_module, "counters_available", lambda device: "no libcuda")
    with caplog.at_level(logging.INFO, logger="offload_compiler.schedule"):
        schedule = _resolve(CUDA, "reduce-overhead")
    assert (schedule.counter_ordering, schedule.host_issued_copies, schedule.rejoin) == (
        False,
        False,
        True,
    )
    assert "copies stay inside CUDA graphs (no libcuda)" in caplog.text


def test_config_mode_wins_and_maps_like_inductor():
    config = OffloadConfig.from_options({**prefetch_options(1, 1, 1), "mode": "max-autotune"})
    schedule = resolve(config, "reduce-overhead", CPU)
    assert schedule.inductor_patches.get("max_autotune") is True
    assert schedule.backend == "prefetch" and schedule.config_hash == config.compute_hash()
    with pytest.raises(TypeError):
        schedule.inductor_patches["max_autotune"] = False  # read-only for everything downstream
