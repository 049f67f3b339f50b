"""Where an offloaded step loses time: the copy engine and the compute stream, call by call.

    python -m benchmarks.profile_offload --out DIR --layers 8 --tokens 1,2048 \
        --config 1/1/1:pp --modes default,reduce-overhead

A benchmark cell says how far a step is from its bound, not why. This builds the benchmark's
Llama-shaped model once per mode, offloaded and compiled as `benchmarks.offload_bench` does, and
keeps them all in one process. For each token count it times the modes in turns, measures each
model's copy floor (its own copies back to back, nothing else running), then records ``--calls``
calls of each mode under the PyTorch profiler (kernels and copies, those replayed from a CUDA
graph included) and writes ``<mode>-<tokens>.json``:

- ``copy_busy_ms_per_call`` and the effective bandwidth of the copies while they ran, beside the
  floor's: copies slower than the floor compete with compute for memory or for the host;
- ``copy_idle_largest``: the gaps between consecutive copies, each with the compute kernels that
  ran inside it (what the next copy waited for);
- ``compute_busy_ms_per_call`` and ``compute_idle_largest`` (what compute waited for);
- memsets (cuBLAS may need some for split-K kernels) and the kernels run most often;
- with ``--cpu``, ``host`` (`host_side`): how long after the host issued each copy or launch the
  device started it (near zero: the device waited for the host), and the CUDA runtime calls by
  total time (a synchronizing call there means the host waited for the device);

and a Chrome trace ``<mode>-<tokens>.trace.json.gz`` (chrome://tracing, Perfetto).
``inductor_counters.json`` holds Inductor's counters after the compiles (CUDA-graph skips).
"""

from __future__ import annotations

import argparse
import functools
import gzip
import itertools
import json
import math
import statistics
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.offload_bench import (
    LLAMA_8B,
    MODES,
    parse_configs,
    parse_ints,
    parse_modes,
    prepare,
)
from benchmarks.timing import copy_floor_ms, time_calls


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=parse_ints, default=[2048], help="e.g. 1,16,2048")
    parser.add_argument(
        "--config",
        type=parse_configs,
        default=parse_configs("1/1/1:pp"),
        help="group/num/step[:pp|:layer]",
    )
    parser.add_argument(
        "--modes", type=parse_modes, default=["default", "reduce-overhead"], help=",".join(MODES)
    )
    parser.add_argument("--calls", type=int, default=3, help="profiled calls per mode")
    parser.add_argument("--cpu", action="store_true", help="profile the host too (`host_side`)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("profiles the copy engine of a CUDA device, and none is available")
    args.out.mkdir(parents=True, exist_ok=True)
    # one model per mode in this process: each compiles a static and a dynamic graph
    torch._dynamo.config.recompile_limit = max(
        torch._dynamo.config.recompile_limit, len(args.modes) * (len(args.tokens) + 1)
    )
    device = torch.device("cuda", torch.cuda.current_device())
    inputs = {t: torch.randint(0, LLAMA_8B["vocab"], (1, t), device=device) for t in args.tokens}
    models = {}
    for mode in args.modes:
        spec = {
            "method": "offload",
            "mode": mode,
            "prefetch": args.config[0],
            "shape": LLAMA_8B,
            "layers": args.layers,
            "tokens": args.tokens,
        }
        prepared = prepare(spec, device, torch.bfloat16)
        with torch.no_grad():
            for ids in inputs.values():  # compiles happen here
                for _ in range(3):
                    prepared.call(ids)
        models[mode] = (prepared.call, *prepared.copies())
    inductor = dict(torch._dynamo.utils.counters["inductor"])
    (args.out / "inductor_counters.json").write_text(json.dumps(inductor, indent=1))
    for tokens, ids in inputs.items():
        calls = {mode: functools.partial(call, ids) for mode, (call, _, _) in models.items()}
        with torch.no_grad():
            times = time_calls(calls, device, runs=5, min_run_s=0.5)
        for mode, (_, moved, hosts) in models.items():
            floor = copy_floor_ms(hosts, device)
            with torch.no_grad():
                prof = profiled_calls(calls[mode], args.calls, args.cpu)
            summary = {
                "mode": mode,
                "config": args.config[0],
                "layers": args.layers,
                "tokens": tokens,
                "ms": statistics.median(times[mode]),
                "ms_runs": times[mode],
                "copied_bytes_per_call": moved,
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
