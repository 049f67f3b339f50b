"""How fast the host-to-device copies ran, by what the device ran beside them.

    python -m benchmarks.copy_neighbours TRACE.json.gz...

For Chrome traces from `benchmarks.profile_offload`: each copy of more than 1 MB is put with
what overlapped most of it (over 60% of its time), else "mixed":

- ``offloaded``: kernels of an offloaded layer, told by a waiting (``spin``) or releasing
  (``bump``) kernel of host copies at most two kernels away (such a layer waits before and
  releases after each weight it reads from its slot);
- ``resident``: other compute kernels;
- ``spin``: the waiting kernel alone (the compute stream idle, waiting for a copy);

and the median bandwidth of each group is printed. A model whose copies slow down beside
compute kernels of any layer, not only those reading its slots, loses bandwidth on its copies'
own path (docs/benchmarks.md, session 15). Default mode has no waiting kernels: its
copies all count as beside ``resident`` kernels.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
from pathlib import Path

_MARKERS = ("spin", "bump")


def label_kernels(kernels: list[dict]) -> list[str]:
    """``spin``, ``bump``, ``offloaded`` or ``resident`` for each kernel, in time order."""
    labels = []
    for i, kernel in enumerate(kernels):
        if kernel["name"] in _MARKERS:
            labels.append(kernel["name"])
            continue
        near = kernels[max(0, i - 2) : i] + kernels[i + 1 : i + 3]
        labels.append("offloaded" if any(k["name"] in _MARKERS for k in near) else "resident")
    return labels


def copies_beside(events: list[dict], min_bytes: float = 1e6) -> dict[str, dict[str, float]]:
    """Per group, how many large host-to-device copies it has and their median GB/s."""
    spans = [e for e in events if e.get("ph") == "X"]
    kernels = sorted((e for e in spans if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    labels = label_kernels(kernels)
    copies = [
        e
        for e in spans
        if e.get("cat") == "gpu_memcpy"
        and "htod" in e.get("name", "").lower()
        and e.get("args", {}).get("bytes", 0) > min_bytes
    ]
    groups: dict[str, list[float]] = {}
    for copy in copies:
        start, end = copy["ts"], copy["ts"] + copy["dur"]
        overlap = dict.fromkeys(("offloaded", "resident", "spin", "bump"), 0.0)
        for kernel, label in zip(kernels, labels, strict=True):
            if kernel["ts"] < end and kernel["ts"] + kernel["dur"] > start:
                overlap[label] += min(end, kernel["ts"] + kernel["dur"]) - max(start, kernel["ts"])
        top = max(overlap, key=overlap.__getitem__)
        group = top if overlap[top] > 0.6 * copy["dur"] else "mixed"
        groups.setdefault(group, []).append(copy["args"]["bytes"] / copy["dur"] / 1e3)
    return {
        group: {"copies": len(rates), "median_GBps": statistics.median(rates)}
        for group, rates in sorted(groups.items())
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("traces", type=Path, nargs="+")
    args = parser.parse_args(argv)
    for path in args.traces:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as raw:
            events = json.load(raw).get("traceEvents", [])
        groups = copies_beside(events)
        text = ", ".join(
            f"{g} {v['median_GBps']:.1f} GB/s ({v['copies']})" for g, v in groups.items()
        )
        print(f"{path}: {text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
