"""Do host-to-device copies run slower inside a CUDA graph whose compute waits on them?

    python -m benchmarks.graph_copy_schedules --out DIR [--tokens 1,256]

The offloaded decode step under ``mode="reduce-overhead"`` ran 1-3% slower than in default
mode because the captured copies ran at 53 GB/s instead of 55 (docs/benchmarks.md). This
replays that schedule with nothing else around it: ``--layers`` layers of ``--params`` weights
the size of one MLP weight of the benchmark model, one slot per weight (prefetch_step 1,
per-parameter streaming). Weight j of layer L is copied into slot j on a side stream once
layer L-1 has read it; the compute stream waits for the copy and reads the slot with a matrix
product with ``tokens`` columns; with ``--resident N`` each layer first reads N resident
weights of the same size (the resident layers of a group: kernels that need no copy). Each way
of copying runs eagerly and as one captured CUDA graph, timed in turns (``--rounds``), and
``graph_copy_schedules.json`` has the median step time and the copies' effective GB/s of each.
On the H100 the captured schedule copied as fast as the eager one (session 5 in the docs):
the slowdown needs more of the compiled model's graph than this.

This is a second implementation of `benchmarks.copy_overlap`'s pipeline (its ``Pipeline`` and
``captured``); what it adds (``--resident``, the ``sm`` copy, the forms timed in turns) is to
move there once a device run can confirm the figures after the move.

- ``ce``: one ``copy_(non_blocking=True)`` per weight (the copy engine), as the runtime does;
- ``ce-chunks``: the same copy in ``--chunk-mib`` pieces;
- ``sm``: an elementwise kernel reading the pinned memory through its device view (the SMs);
- ``ce-no-reads``: the copies alone, forked and joined as in the graph, nothing waiting.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.offload_bench import _ints
from benchmarks.pinned_bandwidth import _timed_ms
from offload_compiler.pool import cuda_view_of_pinned

ROWS, COLS = 14336, 4096  # one MLP weight of the benchmark model (Llama-3-8B shaped)

Copy = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


def _ce(dst: torch.Tensor, host: torch.Tensor, view: torch.Tensor) -> None:
    dst.copy_(host, non_blocking=True)


def _ce_chunks(chunk: int) -> Copy:
    def copy(dst: torch.Tensor, host: torch.Tensor, view: torch.Tensor) -> None:
        for d, h in zip(dst.view(-1).split(chunk), host.view(-1).split(chunk), strict=True):
            d.copy_(h, non_blocking=True)

    return copy


def _sm(dst: torch.Tensor, host: torch.Tensor, view: torch.Tensor) -> None:
    torch.mul(view, 1, out=dst)  # an elementwise kernel (a plain copy_ would be a memcpy)


def step(
    copy: Copy,
    hosts: list[list[tuple[torch.Tensor, torch.Tensor]]],
    slots: list[torch.Tensor],
    x: torch.Tensor | None,
    side: torch.cuda.Stream,
    resident: list[torch.Tensor],
) -> None:
    """One offloaded forward: copies on ``side``, reads (unless ``x`` is None) on the current
    stream, each copy after the previous layer's read of its slot."""
    main = torch.cuda.current_stream()
    side.wait_stream(main)
    freed: list[torch.cuda.Event | None] = [None] * len(slots)
    for layer in hosts:
        for weight in resident if x is not None else []:
            torch.mm(weight, x)
        for j, (host, view) in enumerate(layer):
            with torch.cuda.stream(side):
                if freed[j] is not None:
                    side.wait_event(freed[j])
                copy(slots[j], host, view)
                ready = torch.cuda.Event()
                ready.record(side)
            if x is None:
                continue
            main.wait_event(ready)
            torch.mm(slots[j], x)
            freed[j] = torch.cuda.Event()
            freed[j].record(main)
    main.wait_stream(side)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=_ints, default=[1])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--params", type=int, default=4)
    parser.add_argument("--chunk-mib", type=int, default=16)
    parser.add_argument("--resident", type=int, default=0, help="resident weights per layer")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=5, help="forwards per timed run")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda", torch.cuda.current_device())
    hosts = []
    for _ in range(args.layers):
        layer = []
        for _ in range(args.params):
            host = torch.empty(ROWS, COLS, dtype=torch.bfloat16, pin_memory=True).normal_()
            layer.append((host, cuda_view_of_pinned(host, device)))
        hosts.append(layer)
    weight = {"dtype": torch.bfloat16, "device": device}
    slots = [torch.empty(ROWS, COLS, **weight) for _ in range(args.params)]
    resident = [torch.randn(ROWS, COLS, **weight) for _ in range(args.resident)]
    nbytes = sum(h.nbytes for layer in hosts for h, _ in layer)
    side = torch.cuda.Stream(device)
    chunk = args.chunk_mib * 2**20 // 2
    copies: dict[str, tuple[Copy, bool]] = {
        "ce": (_ce, True),
        "ce-chunks": (_ce_chunks(chunk), True),
        "sm": (_sm, True),
        "ce-no-reads": (_ce, False),
    }
    results = []
    with torch.no_grad():
        for tokens in args.tokens:
            x = torch.randn(COLS, tokens, dtype=torch.bfloat16, device=device)
            runs: dict[str, Callable[[], None]] = {}
            for name, (copy, reads) in copies.items():

                def eager(copy: Copy = copy, x: torch.Tensor | None = x if reads else None) -> None:
                    for _ in range(args.calls):
                        step(copy, hosts, slots, x, side, resident)

                eager()  # warm up (cuBLAS handles, kernels) before capture
                torch.cuda.synchronize(device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step(copy, hosts, slots, x if reads else None, side, resident)
                runs[f"{name} eager"] = eager
                runs[f"{name} graph"] = lambda graph=graph: [
                    graph.replay() for _ in range(args.calls)
                ]
            times: dict[str, list[float]] = {name: [] for name in runs}
            for _ in range(args.rounds):
                for name, run in runs.items():
                    times[name].append(_timed_ms(run) / args.calls)
            for name, ms in times.items():
                median = statistics.median(ms)
                gbps = nbytes / (median * 1e6)
                results.append(
                    {
                        "tokens": tokens,
                        "schedule": name,
                        "ms": median,
                        "ms_runs": ms,
                        "GBps": gbps,
                    }
                )
                print(f"{tokens:5d} tok {name:18s} {median:7.2f} ms {gbps:6.2f} GB/s")
    summary = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "copied_bytes_per_step": nbytes,
        "resident_weights_per_layer": args.resident,
        "results": results,
    }
    (args.out / "graph_copy_schedules.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
