"""Where an offloaded step loses time: the copy engine and the compute stream, call by call.

    python -m benchmarks.profile_offload --out DIR --layers 8 --tokens 1,2048 \
        --config 1/1/1:pp --modes default,reduce-overhead

It builds one model per mode (the benchmark's Llama-shaped model, offloaded and compiled exactly
as `benchmarks.offload_bench` does) and keeps them all, as a paired benchmark cell does. For each
token count it times the modes in turns (median of back-to-back calls), measures each model's
copy floor (its own copies back to back, nothing else running), then records ``--calls`` calls
of each mode under the PyTorch profiler (CUDA activities: kernels and memcpys, also those
replayed from a CUDA graph) and writes ``<mode>-<tokens>.json`` with:

- ``copy_busy_ms``: time the host-to-device copies were running, per call;
- ``copy_idle``: the gaps between consecutive copies, largest first, each with the compute
  kernels that ran inside it (what the next copy was waiting for);
- ``compute_busy_ms`` and the largest gaps on the compute streams (what compute waited for);
- the memsets (count and time per call: cuBLAS may need some for split-K kernels) and the
  kernels run most often, by name;
- the effective bandwidth of the copies (bytes / time each copy ran), and that of the floor;
- ``returned_ms_per_call`` and ``done_ms_per_call``: one more run of back-to-back calls, per
  call until the last returned to Python and until the device finished (`return_ms`: near
  each other only if the host waits for the device);
- ``restores``: how many times the host-copy state was brought back to where a CUDA graph's
  program starts (`SlotCounters._prepare`, each a release on the caller's stream and a copy
  issued before the call), in the timed runs and in the profiled calls;
- with ``--cpu``, ``host``: the host side of the profiled calls (`host_side`): for each copy,
  how long after the host issued it the device started it, the copies the device started at
  once (the copy engine had waited for the host), and the CUDA runtime calls by total time
  (a synchronizing call there means the host waited for the device);
- with ``--pin-cores N``, ``ms_pinned_runs``: the timed runs again with the process on N cores
  (as `benchmarks.offload_bench` measures, on two);

and a Chrome trace ``<mode>-<tokens>.trace.json.gz`` to look at.

A mode may carry flags and a suffix, as in `benchmarks.offload_bench` (``MODE_FLAGS``):
``reduce-overhead.2`` is a second model in the same mode (its own CUDA graph recordings),
``default+rejoin`` runs default mode with the schedule the backend gives graphs that run as
CUDA graphs (``prefetch.offload_capturable``: copies joined at the end, next-call copies at the
top), which tells what the schedule costs from what the CUDA graph costs; ``+static`` compiles
every token count as a graph of static shape, ``+captured`` keeps the copies in the CUDA graphs,
``+hugepages`` and ``+repinned`` move the model's host copies after warm-up into huge-page or
fresh driver-pinned memory (`benchmarks.pinned_pages`).
``inductor_counters.json`` holds Inductor's counters after the compiles (CUDA-graph skips),
``streams.json`` the pool streams the models took, in order (`StreamLog`), ``pages.json`` how
each model's host copies are paged and, with ``--pages``, its copies timed alone and under a
weight-streaming load (`pinned_pages.load_test`, run before any timing), ``slots.json`` where
each model's slot buffers lie in the caching allocator's segments (`slot_placement`).
``benchmarks.compare_profiles`` sets several runs side by side.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import inspect
import itertools
import json
import logging
import math
import os
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

import offload_compiler.runtime as offload_runtime
from benchmarks import pinned_pages, slot_placement
from benchmarks.offload_bench import (
    LLAMA_8B,
    GpuLock,
    _configs,
    _ints,
    _modes,
    copy_floor_ms,
    make_room_for_graphs,
    mode_flags,
    prepare,
    time_calls,
)


def _spans(events) -> list[tuple[float, float, str, int]]:
    return sorted((e.time_range.start, e.time_range.end, e.name, e.device_index) for e in events)


def summarise(prof, calls: int, top: int = 12) -> dict:
    """Copy and compute activity of the profiled calls (times in ms)."""
    cuda = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    copies = _spans(e for e in cuda if "memcpy" in e.name.lower() and "htod" in e.name.lower())
    kernels = _spans(
        e for e in cuda if "memcpy" not in e.name.lower() and "memset" not in e.name.lower()
    )
    gaps = []
    for (_, end, _, _), (start, _, _, _) in itertools.pairwise(copies):
        if start - end > 5:  # µs
            inside = [k for k in kernels if k[0] < start and k[1] > end]
            gaps.append(
                {
                    "ms": (start - end) / 1e3,
                    "at_ms": (end - copies[0][0]) / 1e3,
                    "kernels": [k[2][:80] for k in inside[:6]],
                }
            )
    gaps.sort(key=lambda g: -g["ms"])
    compute_gaps = []
    for (_, end, name, _), (start, _, nxt, _) in itertools.pairwise(kernels):
        if start - end > 20:
            compute_gaps.append({"ms": (start - end) / 1e3, "after": name[:80], "before": nxt[:80]})
    compute_gaps.sort(key=lambda g: -g["ms"])
    copy_busy = sum(e - s for s, e, _, _ in copies) / 1e3
    memsets = _spans(e for e in cuda if "memset" in e.name.lower())
    return {
        "memset_count_per_call": len(memsets) / calls,
        "memset_busy_ms_per_call": sum(e - s for s, e, _, _ in memsets) / 1e3 / calls,
        "kernel_names_most_run": Counter(k[2][:80] for k in kernels).most_common(top),
        "copy_count_per_call": len(copies) / calls,
        "copy_names": sorted({c[2] for c in copies}),
        "copy_busy_ms_per_call": copy_busy / calls,
        "copy_idle_ms_per_call": sum(g["ms"] for g in gaps) / calls,
        "copy_idle_largest": gaps[:top],
        "kernel_count_per_call": len(kernels) / calls,
        "compute_busy_ms_per_call": sum(e - s for s, e, _, _ in kernels) / 1e3 / calls,
        "compute_idle_largest": compute_gaps[:top],
        "window_ms_per_call": (
            max(e for _, e, _, _ in copies + kernels) - min(s for s, _, _, _ in copies + kernels)
        )
        / 1e3
        / calls,
    }


def host_side(trace: dict, calls: int, top: int = 12) -> dict:
    """The host side of a Chrome trace of ``calls`` calls profiled with CPU activities (times
    in ms).

    For each kind of launching runtime call (``cudaMemcpyAsync``, ``cudaGraphLaunch``,
    ``cudaLaunchKernel``...), how long after the host's call returned the device started what
    it launched (matched by correlation id): near zero, the device had been waiting for the
    host. For the host-to-device copies, those the device started within 20 µs of their issue
    and the copy-idle time just before them: what the host's lateness cost the copy engine.
    And the runtime calls by total time (a synchronizing call there: the host waited).
    """
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    runtime = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    issued = {
        e["args"]["correlation"]: (e["name"], e["ts"] + e["dur"])
        for e in runtime
        if "correlation" in e.get("args", {})
    }
    device = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    first: dict[int, float] = {}
    for e in device:
        correlation = e.get("args", {}).get("correlation")
        if correlation in issued:
            first[correlation] = min(first.get(correlation, math.inf), e["ts"])
    leads: dict[str, list[float]] = {}
    for correlation, start in first.items():
        name, end = issued[correlation]
        leads.setdefault(name, []).append((start - end) / 1e3)
    copies = sorted(
        (e["ts"], e["ts"] + e["dur"], e.get("args", {}).get("correlation"))
        for e in device
        if e.get("cat") == "gpu_memcpy" and "htod" in e.get("name", "").lower()
    )
    on_issue, late_idle, previous_end = 0, 0.0, None
    for start, end, correlation in copies:
        if correlation in issued and start - issued[correlation][1] < 20:
            on_issue += 1
            if previous_end is not None:
                late_idle += max(0.0, start - previous_end)
        previous_end = end
    totals: dict[str, list[float]] = {}
    for e in runtime:
        totals.setdefault(e["name"], []).append(e["dur"])
    by_total = sorted(totals.items(), key=lambda item: -sum(item[1]))[:top]
    return {
        "device_start_after_issue_ms": {name: _quantiles(v) for name, v in leads.items()},
        "copies_started_on_issue_per_call": on_issue / calls,
        "copy_idle_before_late_copies_ms_per_call": late_idle / 1e3 / calls,
        "runtime_calls_ms_per_call": [
            {"name": name, "count": len(durs) / calls, "ms": sum(durs) / 1e3 / calls}
            for name, durs in by_total
        ],
    }


def _quantiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {
        "n": len(ordered),
        "min": ordered[0],
        "p10": pick(0.1),
        "median": pick(0.5),
        "max": ordered[-1],
    }


class StreamLog:
    """Every pool stream created (``torch.cuda.Stream``), in order, with the file that asked
    for it and the mode being prepared: CUDA maps streams onto a few hardware queues by
    creation order (``CUDA_DEVICE_MAX_CONNECTIONS``), so which streams of a model may share
    one follows from this order."""

    def __init__(self) -> None:
        self.created: list[dict] = []
        self.mode: str | None = None
        original = torch.cuda.Stream.__new__

        def new(cls, device=None, priority=0, **kwargs):
            stream = original(cls, device, priority, **kwargs)
            if not kwargs:  # from the pool (not an external stream or a stream id)
                caller = next(
                    (f for f in inspect.stack()[1:] if "torch/cuda" not in f.filename), None
                )
                self.created.append(
                    {
                        "index": len(self.created),
                        "mode": self.mode,
                        "stream_id": stream.stream_id,
                        "priority": priority,
                        "by": f"{Path(caller.filename).name}:{caller.function}" if caller else "",
                    }
                )
            return stream

        torch.cuda.Stream.__new__ = staticmethod(new)


class RestoreCounter(logging.Handler):
    """Counts the state restores `SlotCounters._prepare` logs (at DEBUG)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "the graph starts from" in record.getMessage():
            self.count += 1

    def install(self) -> RestoreCounter:
        counters_log = logging.getLogger("offload_compiler.counters")
        counters_log.setLevel(logging.DEBUG)
        counters_log.addHandler(self)
        return self


def profiled_calls(run: Callable[[], object], calls: int, cpu: bool = False):
    """The PyTorch profiler (CUDA activities, replayed graph nodes included; with ``cpu``
    the host's too) over ``calls`` back-to-back ``run()``, between two device syncs."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if cpu else [])
    torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(calls):
            run()
        torch.cuda.synchronize()
    return prof


def return_ms(
    run: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, ms: float, min_run_s: float
) -> dict[str, float]:
    """One run of back-to-back calls (as many as a timed run of a call of ``ms``): ms per call
    until the last call returned to Python, and until the device finished. The first is near
    the second only if something in the call waits for the device (a sync, or a full launch
    queue); where it is much less, the host ran ahead and the device never waited for it."""
    count = max(3, math.ceil(min_run_s * 1e3 / ms))
    torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(count):
        run(ids)
    returned = time.perf_counter()
    torch.cuda.synchronize()
    done = time.perf_counter()
    return {
        "returned_ms_per_call": (returned - begin) * 1e3 / count,
        "done_ms_per_call": (done - begin) * 1e3 / count,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=_ints, default=[2048])
    parser.add_argument("--config", type=_configs, default=_configs("1/1/1:pp"))
    parser.add_argument("--modes", type=_modes, default=["default", "reduce-overhead"])
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--cpu", action="store_true", help="profile the host too (`host_side`)")
    parser.add_argument("--pin-cores", type=int, default=0, help="time again on this many cores")
    parser.add_argument(
        "--pages",
        action="store_true",
        help="time each model's copies alone and under load first (pages.json, `pinned_pages`)",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    restores = RestoreCounter().install()
    streams = StreamLog()
    make_room_for_graphs(len(args.modes), len(args.tokens))

    device = torch.device("cuda", torch.cuda.current_device())
    lock = GpuLock(Path(tempfile.mkstemp()[1]))
    inputs = {t: torch.randint(0, LLAMA_8B["vocab"], (1, t), device=device) for t in args.tokens}
    models = {}
    runtimes = {}
    for mode in args.modes:
        streams.mode = mode
        known = len(offload_runtime._RUNTIMES)
        spec = {
            "method": "offload",
            "mode": mode,
            "prefetch": args.config[0],
            "shape": LLAMA_8B,
            "layers": args.layers,
            "tokens": args.tokens,
            "device": str(device),
        }
        with torch.no_grad():
            models[mode] = prepare(spec, device, torch.bfloat16, lock)
            for ids in inputs.values():  # compiles happen here
                for _ in range(3):
                    models[mode][0](ids)
        (runtimes[mode],) = offload_runtime._RUNTIMES[known:]
    pages = {"transparent_huge_pages": pinned_pages.transparent_huge_pages()}
    for mode, runtime in runtimes.items():
        pinned_pages.rehome_as_flagged(runtime, mode_flags(mode))
        hosts = pinned_pages.host_tensors(runtime)
        models[mode] = (*models[mode][:2], hosts)
        pages[mode] = {"host_pages": pinned_pages.huge_page_share(hosts)}
        if args.pages:
            pages[mode].update(pinned_pages.load_test(runtime, device))
        print(json.dumps({"pages": mode, **pages[mode]}), flush=True)
    (args.out / "pages.json").write_text(json.dumps(pages, indent=1))
    slots = {mode: slot_placement.runtime_placement(r) for mode, r in runtimes.items()}
    for mode, where in slots.items():
        summary = {k: v for k, v in where.items() if k != "by_buffer"}
        print(json.dumps({"slots": mode, **summary}), flush=True)
    (args.out / "slots.json").write_text(json.dumps(slots, indent=1))
    streams.mode = None
    (args.out / "streams.json").write_text(json.dumps(streams.created, indent=1))
    inductor = dict(torch._dynamo.utils.counters["inductor"])
    (args.out / "inductor_counters.json").write_text(json.dumps(inductor, indent=1))
    for tokens, ids in inputs.items():
        with torch.no_grad():
            calls = {mode: call for mode, (call, _, _) in models.items()}
            before = restores.count
            times = time_calls(calls, ids, True, 5, 0.5)
            timed_restores = restores.count - before
            returns = {
                mode: return_ms(call, ids, statistics.median(times[mode]), 0.5)
                for mode, call in calls.items()
            }
            pinned = {}
            if args.pin_cores:
                cores = sorted(os.sched_getaffinity(0))
                os.sched_setaffinity(0, cores[: args.pin_cores])
                pinned = time_calls(calls, ids, True, 5, 0.5)
                os.sched_setaffinity(0, cores)
        for mode, (call, moved, hosts) in models.items():
            floor = copy_floor_ms(hosts, device)
            before = restores.count
            with torch.no_grad():
                prof = profiled_calls(functools.partial(call, ids), args.calls, args.cpu)
            profiled_restores = restores.count - before
            summary = {
                "mode": mode,
                "config": args.config[0],
                "layers": args.layers,
                "tokens": tokens,
                "ms": statistics.median(times[mode]),
                "ms_runs": times[mode],
                **returns[mode],
                "ms_pinned_runs": pinned.get(mode),
                "restores": {"timed_runs_all_modes": timed_restores, "profiled": profiled_restores},
                "copied_bytes_per_call": moved,
                "cuda_device_max_connections": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS"),
                "copy_floor_ms": floor,
                "copy_floor_GBps": moved / (floor * 1e6),
                **summarise(prof, args.calls),
            }
            summary["copy_GBps_while_running"] = moved / (summary["copy_busy_ms_per_call"] * 1e6)
            name = f"{mode}-{tokens}"
            trace = args.out / f"{name}.trace.json"
            prof.export_chrome_trace(str(trace))
            if args.cpu:
                summary["host"] = host_side(json.loads(trace.read_text()), args.calls)
            (args.out / f"{name}.json").write_text(json.dumps(summary, indent=1))
            with trace.open("rb") as raw, gzip.open(f"{trace}.gz", "wb") as packed:
                packed.write(raw.read())
            trace.unlink()
            print(json.dumps({k: v for k, v in summary.items() if "largest" not in k}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
