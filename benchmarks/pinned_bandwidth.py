"""How fast pinned host buffers copy to the GPU, buffer by buffer, by how they were pinned.

    python -m benchmarks.pinned_bandwidth --out DIR [--buffers 24] [--mib 112]

An offloaded forward's floor is its copied bytes over the H2D bandwidth. This checks whether
that bandwidth is a property of the machine or of each pinned buffer: it allocates
``--buffers`` buffers the size of one MLP weight of the benchmark model for each way of pinning,
times every buffer's copy in turns (``--repeats`` rounds, so a drift of the machine reaches all
alike) and writes ``pinned_bandwidth.json`` with each buffer's median GB/s and the spread per
way of pinning:

- ``torch``: ``torch.empty(..., pin_memory=True)`` (PyTorch's caching host allocator, which
  rounds each allocation up to a power of two);
- ``register``: an ordinary host tensor, page-locked in place with ``cudaHostRegister``;
- ``register-huge``: the same over an anonymous mapping advised to use transparent huge pages.

With ``--graphs N`` it also captures N CUDA graphs that each copy all ``torch`` buffers back to
back on a side stream (forked from and joined into the capture stream, as the backend's copies
are) and times the graphs in turns against the same copies issued eagerly: whether a captured
copy is as fast as an eager one, and whether every recording of the same copies is as fast.

With ``--streams N`` it copies the same ``torch`` buffers eagerly on each of N streams
(``torch.cuda.Stream()``, which hands out PyTorch's pool of streams in turn; the first half at
low, the second at high priority), in turns: whether the H2D bandwidth is a property of the
stream a copy is issued on (the hardware channel and copy engine the driver maps it to).
"""

from __future__ import annotations

import argparse
import json
import mmap
import statistics
from collections.abc import Callable
from pathlib import Path

import torch


def _registered(nbytes: int, huge: bool) -> tuple[torch.Tensor, object]:
    """A host tensor page-locked with cudaHostRegister, and what keeps its memory alive."""
    if huge:
        keep: object = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        keep.madvise(mmap.MADV_HUGEPAGE)
        tensor = torch.frombuffer(keep, dtype=torch.uint8)
    else:
        tensor = torch.empty(nbytes, dtype=torch.uint8)
        keep = tensor
    tensor.fill_(1)  # fault the pages in before they are locked
    err = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), nbytes, 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister failed: {err}")
    return tensor, keep


def _allocate(how: str, nbytes: int) -> tuple[torch.Tensor, object]:
    if how == "torch":
        tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return tensor, tensor
    return _registered(nbytes, huge=how == "register-huge")


def _timed_ms(run: Callable[[], object]) -> float:
    """GPU time of what ``run`` enqueues on the current stream, between two events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _copy_ms(src: torch.Tensor, dst: torch.Tensor) -> float:
    return _timed_ms(lambda: dst.copy_(src, non_blocking=True))


def _forked_copies(srcs: list[torch.Tensor], dst: torch.Tensor, side: torch.cuda.Stream) -> None:
    """Copy ``srcs`` into ``dst`` one after another on ``side``, forked from and joined into
    the current stream (as the backend's copy stream is)."""
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for src in srcs:
            dst.copy_(src, non_blocking=True)
    torch.cuda.current_stream().wait_stream(side)


def _graph_copies(srcs: list[torch.Tensor], dst: torch.Tensor, graphs: int, repeats: int) -> dict:
    """GB/s of copying ``srcs`` into ``dst`` eagerly and in each of ``graphs`` recordings."""
    side = torch.cuda.Stream()
    nbytes = sum(s.nbytes for s in srcs)

    def copies() -> None:
        _forked_copies(srcs, dst, side)

    recorded = []
    for _ in range(graphs):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            copies()
        recorded.append(graph)
    runs = {"eager": copies, **{f"graph{i}": g.replay for i, g in enumerate(recorded)}}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats + 1):  # the first round untimed
        for name, run in runs.items():
            times[name].append(_timed_ms(run))
    return {name: nbytes / (statistics.median(t[1:]) * 1e6) for name, t in times.items()}


def _stream_copies(srcs: list[torch.Tensor], dst: torch.Tensor, streams: int, repeats: int) -> dict:
    """GB/s of copying ``srcs`` into ``dst`` on each of ``streams`` streams, timed in turns."""
    nbytes = sum(s.nbytes for s in srcs)
    pool = [torch.cuda.Stream(priority=0 if i < streams // 2 else -1) for i in range(streams)]
    times: list[list[float]] = [[] for _ in pool]
    for _ in range(repeats + 1):  # the first round untimed
        for i, stream in enumerate(pool):
            times[i].append(_timed_ms(lambda stream=stream: _forked_copies(srcs, dst, stream)))
    per_stream = [
        {
            "stream_id": stream.stream_id,
            "priority": stream.priority,
            "GBps": nbytes / (statistics.median(t[1:]) * 1e6),
            "GBps_runs": [nbytes / (ms * 1e6) for ms in t[1:]],
        }
        for stream, t in zip(pool, times, strict=True)
    ]
    gbps = [s["GBps"] for s in per_stream]
    return {
        "per_stream": per_stream,
        "min": min(gbps),
        "max": max(gbps),
        "spread": max(gbps) / min(gbps) - 1,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--buffers", type=int, default=24)
    parser.add_argument("--mib", type=float, default=112.0, help="size of each buffer")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ways", default="torch,register,register-huge")
    parser.add_argument("--graphs", type=int, default=0, help="CUDA graph recordings to time")
    parser.add_argument("--streams", type=int, default=0, help="streams to time copies on")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    nbytes = int(args.mib * 2**20)
    device = torch.device("cuda", torch.cuda.current_device())
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    buffers: dict[str, list[tuple[torch.Tensor, object]]] = {}
    for how in args.ways.split(","):
        buffers[how] = [_allocate(how, nbytes) for _ in range(args.buffers)]
    times: dict[str, list[list[float]]] = {h: [[] for _ in b] for h, b in buffers.items()}
    for bufs in buffers.values():  # a first copy of each, untimed
        for tensor, _ in bufs:
            _copy_ms(tensor, dst)
    for _ in range(args.repeats):
        for i in range(args.buffers):
            for how, bufs in buffers.items():
                times[how][i].append(_copy_ms(bufs[i][0], dst))
    result: dict[str, object] = {
        "device_name": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "buffer_bytes": nbytes,
        "buffers": args.buffers,
        "repeats": args.repeats,
    }
    for how, per_buffer in times.items():
        gbps = [nbytes / (statistics.median(t) * 1e6) for t in per_buffer]
        result[how] = {
            "per_buffer_GBps": gbps,
            "min": min(gbps),
            "median": statistics.median(gbps),
            "max": max(gbps),
            "spread": max(gbps) / min(gbps) - 1,
            "repeat_spread_median": statistics.median(max(t) / min(t) - 1 for t in per_buffer),
        }
        print(how, {k: v for k, v in result[how].items() if k != "per_buffer_GBps"}, flush=True)
    if args.graphs and "torch" in buffers:
        srcs = [tensor for tensor, _ in buffers["torch"]]
        result["graphs_GBps"] = _graph_copies(srcs, dst, args.graphs, args.repeats)
        print("graphs", result["graphs_GBps"], flush=True)
    if args.streams and "torch" in buffers:
        srcs = [tensor for tensor, _ in buffers["torch"]]
        result["streams_GBps"] = _stream_copies(srcs, dst, args.streams, args.repeats)
        print("streams", {k: v for k, v in result["streams_GBps"].items() if k != "per_stream"})
        for s in result["streams_GBps"]["per_stream"]:
            print(
                s["stream_id"],
                s["priority"],
                round(s["GBps"], 2),
                [round(g, 2) for g in s["GBps_runs"]],
            )
    for how, bufs in buffers.items():
        if how != "torch":
            for tensor, _ in bufs:
                torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())
    (args.out / "pinned_bandwidth.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
