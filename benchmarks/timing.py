"""One way to time calls and copies, on a CUDA device or the CPU.

Every time here is wall-clock time around back-to-back work between two device-wide syncs. An
offloaded forward leaves copies for the next call running when it returns; a sync per call, or
an end event on the compute stream alone, would leave them outside the timed window.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import torch


def sync(device: torch.device) -> None:
    """Wait for all work on ``device`` (every stream); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(fn: Callable[[], object], device: torch.device, count: int = 1) -> float:
    """ms per call of ``count`` back-to-back calls of ``fn``, between two syncs of ``device``."""
    sync(device)
    begin = time.perf_counter()
    for _ in range(count):
        fn()
    sync(device)
    return (time.perf_counter() - begin) * 1e3 / count


def time_calls(
    calls: Mapping[str, Callable[[], object]], device: torch.device, runs: int, min_run_s: float
) -> dict[str, list[float]]:
    """ms per call of each of ``calls``, one value per run: ``runs`` runs of back-to-back calls,
    each at least ``min_run_s`` long (and at least 3 calls). The callables take turns run by
    run, so a drift of the machine (its H2D bandwidth moves by several percent within minutes
    on a shared host) reaches all of them alike."""
    counts = {
        name: max(3, math.ceil(min_run_s * 1e3 / max(wall_ms(fn, device), 1e-6)))
        for name, fn in calls.items()
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(runs):
        for name, fn in calls.items():
            times[name].append(wall_ms(fn, device, counts[name]))
    return times


def copy_floor_ms(hosts: Sequence[torch.Tensor], device: torch.device, repeats: int = 3) -> float:
    """ms to copy ``hosts`` to ``device`` back to back on one stream, nothing else running
    (median of ``repeats`` after one untimed pass): the floor of a forward that copies them.

    Taken from the very host tensors a forward copies (their sizes, their pinned memory) and
    right around its timed runs, it is a truer copy term for the bound than a bandwidth probe.
    """
    if not hosts:
        raise ValueError("no host tensors to copy")
    flat = [h.reshape(-1).view(torch.uint8) for h in hosts]
    scratch = torch.empty(max(f.numel() for f in flat), dtype=torch.uint8, device=device)
    cuda = device.type == "cuda"
    stream = torch.cuda.Stream(device) if cuda else None

    def copies() -> None:
        with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
            for f in flat:
                scratch[: f.numel()].copy_(f, non_blocking=cuda)

    wall_ms(copies, device)
    return statistics.median(wall_ms(copies, device) for _ in range(repeats))


def h2d_gbps(device: torch.device, nbytes: int = 256 * 2**20) -> float:
    """This machine's host-to-device bandwidth now, in GB/s: `copy_floor_ms` of one buffer of
    ``nbytes`` (pinned for a CUDA device; on the CPU, a host-to-host copy)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    return nbytes / (copy_floor_ms([host], device) * 1e6)
