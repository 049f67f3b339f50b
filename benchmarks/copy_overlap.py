"""Does a CUDA graph run the offload copy pipeline slower than eager streams? (issue #7)

    python -m benchmarks.copy_overlap --out DIR        # on a CUDA machine

No model and no compiler: the per-parameter prefetch pipeline of the `offload` backend written
with plain streams and events over Llama-3-8B-shaped weights (every layer offloaded, one slot
per parameter, prefetch_step 1). Layer k reads each slot with a matmul over ``tokens`` rows;
right after that the copy of the same parameter of layer k+1 starts on the copy stream (after
an event on the compute stream), and layer k+1 waits for it. The same step runs eagerly and as
a captured CUDA graph (``torch.cuda.graph``, the copy stream forked from and joined into the
capture stream, as cudagraph trees see the backend's ops), with variants that isolate where a
captured graph loses:

- ``copies``: the copies alone, ``compute``: the matmuls alone;
- ``pipeline``: both, ordered as the backend orders them;
- ``pipeline-hiprio``: the same with the copy stream created at high priority;
- ``copies-chunked``, ``pipeline-chunked``: each copy split into 16 MiB pieces (graph memcpy
  nodes have size-dependent behaviour, pytorch issue 191284).

Each variant reports ms per step (median of ``--runs`` runs of back-to-back steps between two
device syncs) and, with ``--profile``, how the profiler saw the copies in each form (memcpy
activities on a copy engine, or kernels).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from benchmarks.offload_bench import PROBE_BYTES, fill_from_block, time_calls
from offload_compiler.demo import h2d_gbps

# (name, out features, in features) of one Llama-3-8B layer's matmul weights, in use order
LAYER = [
    ("q", 4096, 4096),
    ("k", 1024, 4096),
    ("v", 1024, 4096),
    ("o", 4096, 4096),
    ("gate", 14336, 4096),
    ("up", 14336, 4096),
    ("down", 4096, 14336),
]


def host_weights(layers: int) -> list[dict[str, torch.Tensor]]:
    """Pinned host weights of ``layers`` layers, filled from one random block (quick to make)."""
    block = torch.randn(2**24, dtype=torch.bfloat16) * 0.02
    weights = []
    for _ in range(layers):
        layer = {}
        for name, out, inp in LAYER:
            flat = torch.empty(out * inp, dtype=torch.bfloat16, pin_memory=True)
            fill_from_block(flat, block)
            layer[name] = flat.view(out, inp)
        weights.append(layer)
    return weights


class Pipeline:
    """One slot per parameter and the step that streams ``host``'s layers through the slots
    while computing with them (copies optionally split into ``chunk_bytes`` pieces)."""

    def __init__(
        self,
        host: list[dict[str, torch.Tensor]],
        tokens: int,
        device: torch.device,
        high_priority: bool,
        chunk_bytes: int | None,
    ) -> None:
        self.device = device
        self.host = host
        self.chunk = chunk_bytes
        self.slots = {
            n: torch.empty(o, i, dtype=torch.bfloat16, device=device) for n, o, i in LAYER
        }
        self.x = {
            n: torch.randn(tokens, i, dtype=torch.bfloat16, device=device) for n, _, i in LAYER
        }
        self.out = {
            n: torch.empty(tokens, o, dtype=torch.bfloat16, device=device) for n, o, _ in LAYER
        }
        self.stream = torch.cuda.Stream(device, priority=-1 if high_priority else 0)
        units = [(k, n) for k in range(len(host)) for n, _, _ in LAYER]
        self.ready = {u: torch.cuda.Event() for u in units}
        self.done = {u: torch.cuda.Event() for u in units}
        self.bytes = sum(t.nbytes for layer in host for t in layer.values())
        for n, _, _ in LAYER:  # layer 0 in its slots before the first step
            self.slots[n].copy_(host[0][n])
        torch.cuda.synchronize(device)
        self.pending: set[tuple[int, str]] = set()

    def _copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if self.chunk is None:
            dst.copy_(src, non_blocking=True)
            return
        flat_dst, flat_src = dst.view(-1), src.view(-1)
        step = self.chunk // dst.element_size()
        for begin in range(0, flat_dst.numel(), step):
            flat_dst[begin : begin + step].copy_(flat_src[begin : begin + step], non_blocking=True)

    def _start(self, k: int, name: str) -> None:
        compute = torch.cuda.current_stream(self.device)
        ready, done = self.ready[(k, name)], self.done[(k, name)]
        ready.record(compute)
        self.stream.wait_event(ready)
        with torch.cuda.stream(self.stream):
            self._copy(self.slots[name], self.host[k][name])
        done.record(self.stream)
        self.pending.add((k, name))

    def _wait(self, k: int, name: str) -> None:
        if (k, name) in self.pending:
            self.pending.discard((k, name))
            torch.cuda.current_stream(self.device).wait_event(self.done[(k, name)])

    def step(self, copies: bool, compute: bool, join: bool) -> None:
        """One forward: layer k's matmuls, each followed by the copy of layer k+1's same
        parameter (layer 0 of the next step after the last layer)."""
        layers = len(self.host)
        for k in range(layers):
            for name, _, _ in LAYER:
                if copies:
                    self._wait(k, name)
                if compute:
                    torch.matmul(self.x[name], self.slots[name].t(), out=self.out[name])
                if copies:
                    self._start((k + 1) % layers, name)
        if join and copies:
            self.pending.clear()
            torch.cuda.current_stream(self.device).wait_stream(self.stream)


def time_steps(step, runs: int, min_run_s: float = 0.3) -> list[float]:
    """ms per step of ``runs`` runs of back-to-back steps, as the benchmark times a forward."""
    return time_calls({"step": lambda _: step()}, None, True, runs, min_run_s)["step"]


def captured(pipe: Pipeline, copies: bool, compute: bool):
    """The step captured as a CUDA graph (copy stream forked from and joined into the capture
    stream); returns its replay."""
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream(pipe.device)
    side.wait_stream(torch.cuda.current_stream(pipe.device))
    with torch.cuda.stream(side):  # warm-up, as cudagraph trees do before recording
        pipe.step(copies, compute, join=True)
    torch.cuda.current_stream(pipe.device).wait_stream(side)
    torch.cuda.synchronize(pipe.device)
    with torch.cuda.graph(graph):
        pipe.step(copies, compute, join=True)
    torch.cuda.synchronize(pipe.device)
    return graph.replay


def profile_kinds(step, device: torch.device) -> dict:
    """What the profiler recorded for one step (`benchmarks.profile_offload.summarise`): the
    host-to-device copies (memcpy activities on a copy engine) and the kernels, by name, with
    their time and the gaps between copies."""
    from benchmarks.profile_offload import profiled_calls, summarise

    with torch.cuda.device(device):
        step()  # warm-up
        return summarise(profiled_calls(step, 1), calls=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 256, 2048, 8192])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device())
    gbps = h2d_gbps(device, PROBE_BYTES)
    rows = []
    variants = {  # copies, compute, high-priority copy stream, chunk size
        "copies": (True, False, False, None),
        "copies-chunked": (True, False, False, 16 * 2**20),
        "compute": (False, True, False, None),
        "pipeline": (True, True, False, None),
        "pipeline-hiprio": (True, True, True, None),
        "pipeline-chunked": (True, True, False, 16 * 2**20),
    }
    host = host_weights(args.layers)
    for tokens in args.tokens:
        for variant, (copies, compute, hiprio, chunk) in variants.items():
            pipe = Pipeline(host, tokens, device, hiprio, chunk)
            forms = {
                "eager": lambda p=pipe, c=copies, m=compute: p.step(c, m, join=False),
                "graph": captured(pipe, copies, compute),
            }
            for form, step in forms.items():
                times = time_steps(step, args.runs)
                row = {
                    "tokens": tokens,
                    "variant": variant,
                    "form": form,
                    "ms": statistics.median(times),
                    "ms_runs": times,
                    "copy_bound_ms": pipe.bytes / (gbps * 1e6) if copies else 0.0,
                }
                if args.profile and variant in ("pipeline", "copies"):
                    row["profile"] = profile_kinds(step, device)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "ms_runs"}), flush=True)
            del pipe, forms
            torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "h2d_GBps": gbps,
        "layers": args.layers,
        "rows": rows,
    }
    (args.out / "copy_overlap.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
