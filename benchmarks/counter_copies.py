"""Copies outside a CUDA graph, ordered with its replays by counters in device memory.

    python -m benchmarks.counter_copies --out DIR

Session 11 found that the memcpy nodes of some CUDA-graph launches run 2-4% slower than the
same copies issued eagerly (docs/benchmarks.md), and that taking the copies out of the graph
by splitting it at every prefetch op costs more than it saves. This probe measures the design
left: the graph holds the compute only, and before each read of a slot a one-thread kernel
spins until a counter says the slot's copy landed (and after the read, bumps the slot's read
counter); the host issues each call's copies on a copy stream after launching the replay, each
waiting with ``cuStreamWaitValue32`` until the slot's previous reader is done and followed by
``cuStreamWriteValue32`` of how many copies into that slot have landed. No event or graph edge
joins the two streams, so the copies run as in default mode while the compute replays.

The pipeline mimics a decode step of 16 Llama-3-8B-shaped layers with one in four offloaded,
per parameter: per offloaded layer, ``--resident`` GEMVs over resident 112 MiB weights, then
``--weights`` 112 MiB weights each copied into a slot of its own and read by one GEMV (one slot
per weight index, shared by the offloaded layers: a copy waits for the previous layer's read).
Variants, timed in turns (median of back-to-back calls between two syncs; ``--runs`` runs of at
least ``--min-run-s``):

- ``eager``: copies on a side stream ordered by events, as default mode;
- ``graph``, ``graph.2``: the same captured into one CUDA graph (copies as memcpy nodes on a
  forked stream, joined at the end), two recordings;
- ``counters``, ``counters.2``: the compute captured with the spin and bump kernels, the copies
  issued by the host with stream memory operations, two recordings.

Every variant's output must equal the eager one's (checked after timing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from offload_compiler.counters import StreamMemOps

ROWS, COLS = 14336, 4096  # a Llama-3-8B MLP weight: 112 MiB in bf16


def _kernels() -> tuple[Callable, Callable]:
    import triton
    import triton.language as tl

    # one build each for every slot: the counters' base pointers (fresh allocations, equally
    # aligned) and an unspecialised index, so no build (and module load) happens after the warm-up
    @triton.jit(do_not_specialize=["index"])
    def wait_landed(landed_ptr, reads_ptr, index):
        need = tl.atomic_add(reads_ptr + index, 0, sem="relaxed") + 1
        while tl.atomic_add(landed_ptr + index, 0, sem="acquire") < need:
            pass

    @triton.jit(do_not_specialize=["index"])
    def bump(reads_ptr, index):
        tl.atomic_add(reads_ptr + index, 1, sem="release")

    return wait_landed, bump


def _random(device: torch.device) -> torch.Tensor:
    return torch.empty(ROWS, COLS, dtype=torch.bfloat16, device=device).uniform_(-1, 1)


def _scaled(out: torch.Tensor) -> torch.Tensor:
    """The next GEMV's input from a GEMV's output (ROWS long): its first COLS values, scaled to
    a largest magnitude of 1 so that no value underflows over the step."""
    h = out[:COLS]
    return h / h.abs().max()


class Pipeline:
    """The weights, slots and vectors of the decode-step mimic, and its three schedules."""

    def __init__(self, layers: int, weights: int, resident: int) -> None:
        dev = torch.device("cuda")
        self.layers, self.weights = layers, weights
        self.hosts = [
            [_random(dev).cpu().pin_memory() for _ in range(weights)] for _ in range(layers)
        ]
        self.resident = [_random(dev) for _ in range(resident)]
        self.slots = [
            torch.empty(ROWS, COLS, dtype=torch.bfloat16, device=dev) for _ in range(weights)
        ]
        self.x = torch.randn(COLS, dtype=torch.bfloat16, device=dev)
        self.copy_stream = torch.cuda.Stream()
        self.ready = [torch.cuda.Event() for _ in range(weights)]
        self.done = [torch.cuda.Event() for _ in range(weights)]

    def step(self, read_slot: Callable[[int, int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """One forward: per layer, the resident GEMVs, then each offloaded weight's GEMV via
        ``read_slot(layer, weight, h)`` (which orders it with the copy into the slot)."""
        h = self.x
        for layer in range(self.layers):
            for w in self.resident:
                h = _scaled(torch.mv(w, h))
            for weight in range(self.weights):
                h = _scaled(read_slot(layer, weight, h))
        return h


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--weights", type=int, default=4)
    parser.add_argument("--resident", type=int, default=12)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--min-run-s", type=float, default=1.0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print("building the pipeline", flush=True)
    pipe = Pipeline(args.layers, args.weights, args.resident)
    memops = StreamMemOps()
    wait_landed, bump = _kernels()
    # load both kernels before any copy waits on a counter: Triton loads a kernel's module at
    # its first launch, which waited for the device while the copy stream sat on a counter only
    # that kernel would bump (the first device run hung in Triton's _init_handles)
    landed_warm = torch.ones(1, dtype=torch.int32, device="cuda")
    reads_warm = torch.zeros(1, dtype=torch.int32, device="cuda")
    wait_landed[(1,)](landed_warm, reads_warm, 0, num_warps=1)  # 1 >= 0 + 1: returns at once
    bump[(1,)](reads_warm, 0, num_warps=1)
    torch.cuda.synchronize()
    compute = torch.cuda.current_stream()

    def eager_read(layer: int, weight: int, h: torch.Tensor) -> torch.Tensor:
        # copy into the slot after its previous read, then read it
        stream = torch.cuda.current_stream()
        pipe.ready[weight].record(stream)
        pipe.copy_stream.wait_event(pipe.ready[weight])
        with torch.cuda.stream(pipe.copy_stream):
            pipe.slots[weight].copy_(pipe.hosts[layer][weight], non_blocking=True)
        pipe.done[weight].record(pipe.copy_stream)
        stream.wait_event(pipe.done[weight])
        return torch.mv(pipe.slots[weight], h)

    def eager() -> torch.Tensor:
        return pipe.step(eager_read)

    def joined() -> torch.Tensor:
        out = pipe.step(eager_read)
        torch.cuda.current_stream().wait_stream(pipe.copy_stream)
        return out

    def captured(body: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(compute)
        with torch.cuda.stream(side):
            body()  # warm-up (cuBLAS handles, Triton builds) off the capture
        compute.wait_stream(side)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            out = body()
        torch.cuda.synchronize()
        return graph, out

    def graph_variant() -> Callable[[], torch.Tensor]:
        graph, out = captured(joined)

        def run() -> torch.Tensor:
            graph.replay()
            return out

        return run

    def counter_variant() -> Callable[[], torch.Tensor]:
        landed = torch.zeros(args.weights, dtype=torch.int32, device="cuda")
        reads = torch.zeros(args.weights, dtype=torch.int32, device="cuda")
        copies = [0] * args.weights  # copies issued into each slot so far
        # the zeros are written on the compute stream; the copy stream's waits and writes on
        # the counters must come after them
        pipe.copy_stream.wait_stream(compute)

        def read(layer: int, weight: int, h: torch.Tensor) -> torch.Tensor:
            wait_landed[(1,)](landed, reads, weight, num_warps=1)
            out = torch.mv(pipe.slots[weight], h)
            bump[(1,)](reads, weight, num_warps=1)
            return out

        def issue_copies() -> None:
            for layer in range(args.layers):
                for weight in range(args.weights):
                    n = copies[weight]
                    # the slot's previous reader done
                    memops.wait_geq(pipe.copy_stream, reads[weight:].data_ptr(), n)
                    with torch.cuda.stream(pipe.copy_stream):
                        pipe.slots[weight].copy_(pipe.hosts[layer][weight], non_blocking=True)
                    memops.write(pipe.copy_stream, landed[weight:].data_ptr(), n + 1)
                    copies[weight] = n + 1

        # the warm-up reads what these copies bring; the capture runs nothing
        issue_copies()
        graph, out = captured(lambda: pipe.step(read))

        def run() -> torch.Tensor:
            graph.replay()
            issue_copies()
            return out

        return run

    with torch.no_grad():
        expected = joined().float().clone()
        torch.cuda.synchronize()
        variants: dict[str, Callable[[], torch.Tensor]] = {"eager": eager}
        for name, make in [
            ("graph", graph_variant),
            ("graph.2", graph_variant),
            ("counters", counter_variant),
            ("counters.2", counter_variant),
        ]:
            print(f"recording {name}", flush=True)
            variants[name] = make()
        print("first calls", flush=True)
        first = {name: _alone(run) for name, run in variants.items()}
        torch.cuda.synchronize()
        floor = _copy_floor_ms(pipe)
        times: dict[str, list[float]] = {name: [] for name in variants}
        counts = {
            name: max(3, round(args.min_run_s * 1e3 / _run(run, 3)))
            for name, run in variants.items()
        }
        for _ in range(args.runs):
            for name, run in variants.items():
                times[name].append(_run(run, counts[name]))
        outputs = {name: _alone(run) for name, run in variants.items()}
        torch.cuda.synchronize()
    scale = expected.abs().max().item()
    results = []
    for name, ms in times.items():
        turns = [a / b - 1 for a, b in zip(ms, times["eager"], strict=True)]
        results.append(
            {
                "variant": name,
                "ms": statistics.median(ms),
                "ms_runs": ms,
                "vs_eager_median_turn": statistics.median(turns),
                "vs_floor": statistics.median(ms) / floor,
                "max_error_vs_eager_first": (outputs[name] - expected).abs().max().item() / scale,
                "output_changed_by": (outputs[name] - first[name]).abs().max().item() / scale,
            }
        )
        print(json.dumps({k: v for k, v in results[-1].items() if k != "ms_runs"}), flush=True)
    summary = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "args": {k: str(v) for k, v in vars(args).items()},
        "copy_floor_ms": floor,
        "results": results,
    }
    (args.out / "counter_copies.json").write_text(json.dumps(summary, indent=1))
    wrong = [r["variant"] for r in results if r["max_error_vs_eager_first"] > 1e-3]
    if wrong:
        raise SystemExit(f"outputs differ from eager: {wrong}")
    return 0


def _alone(run: Callable[[], torch.Tensor]) -> torch.Tensor:
    """One call's output, with nothing of another variant in flight: the variants share the
    slots, and the counter variants' copies are ordered with their own graph's reads only (one
    issued right after another variant's call overwrote a slot that call still read)."""
    torch.cuda.synchronize()
    out = run().float().clone()
    torch.cuda.synchronize()
    return out


def _run(run: Callable[[], torch.Tensor], count: int) -> float:
    torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(count):
        run()
    torch.cuda.synchronize()
    return (time.perf_counter() - begin) * 1e3 / count


def _copy_floor_ms(pipe: Pipeline) -> float:
    """The pipeline's copies back to back on the copy stream, nothing else running."""
    torch.cuda.synchronize()
    begin = time.perf_counter()
    with torch.cuda.stream(pipe.copy_stream):
        for layer in pipe.hosts:
            for weight, host in enumerate(layer):
                pipe.slots[weight].copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return (time.perf_counter() - begin) * 1e3


if __name__ == "__main__":
    raise SystemExit(main())
