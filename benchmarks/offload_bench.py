"""Offloaded step time against the physical bound and against other offloaders.

    python -m benchmarks.offload_bench --out DIR            # on a CUDA machine
    python -m benchmarks.offload_bench --smoke --out DIR    # tiny CPU run (CI)
    python -m benchmarks.offload_bench --merge DIR... --out DIR

Each cell (a method, a configuration, an Inductor mode) runs in a fresh process, so offloaded
host copies and compile state never leak from one cell into the next. ``--jobs`` workers prepare
(build, compile, warm up) at once, but only one at a time measures: a worker touches the GPU only
while it holds a file lock, which it gives up while Dynamo compiles (the long, CPU-only part)
and which the measuring worker holds throughout its timed runs. A cell times one forward over
each token count (batch 1) and prints one JSON line. The parent gathers them and writes
``results.json``, ``results.md`` and ``results.png`` into ``--out``; ``--merge`` joins the
results of several runs (one grid split over several device calls).

Bound of a cell: max(T_compute, copy time), where T_compute is the same model compiled without
offloading in the same mode, and the copy time is the cell's copy floor (its own copies back to
back, measured around its timed runs), or for cells that have none, copied bytes / the H2D
bandwidth measured in the same run. An offloaded forward can be no faster than either.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import fcntl
import functools
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

import offload_compiler
from benchmarks.timing import copy_floor_ms, h2d_gbps, sync, time_calls

LLAMA_8B = {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "vocab": 128256}
SMOKE = {"hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 2, "vocab": 256}
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
PROBE_BYTES = 512 * 2**20  # the bandwidth probe's pinned buffer
NOISY_SPREAD = 0.05  # timed runs of a cell that differ more than this are flagged


# --- one cell, in its own process ------------------------------------------------------------


def build_model(spec: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """transformers' LlamaForCausalLM with random weights, else the package's LlamaShaped.

    On the CPU the parameters are created on the meta device and then filled from one random
    block: initialising 8B parameters one by one takes minutes on a few cores, and a model too
    big for the GPU (the capped cell) has to be built there.
    """
    if device.type != "cpu":
        return _build(spec, device, dtype)
    with _parameters_on_meta():
        model = _build(spec, torch.device("cpu"), dtype)
    _fill_random(model, dtype)
    return model


@contextlib.contextmanager
def _parameters_on_meta():
    """Parameters registered inside go to the meta device (no memory, initialisers do
    nothing); buffers, such as rotary frequencies, stay real."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _fill_random(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Real CPU parameters for the meta ones: norm weights 1, matrices copies of one block of
    N(0, 0.02) values (tied parameters stay tied)."""
    block = torch.randn(2**24, generator=torch.Generator().manual_seed(0)).mul_(0.02).to(dtype)
    made: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in made:
                value = torch.empty(param.shape, dtype=param.dtype)
                if value.dim() == 1:
                    value.fill_(1.0)
                else:
                    fill_from_block(value.view(-1), block)
                made[id(param)] = torch.nn.Parameter(value, requires_grad=param.requires_grad)
            module._parameters[name] = made[id(param)]


def fill_from_block(flat: torch.Tensor, block: torch.Tensor) -> None:
    """Fill the 1-D ``flat`` with copies of ``block``: random-looking values at the cost of a
    copy, where drawing billions of random numbers on a few cores takes minutes."""
    for begin in range(0, flat.numel(), block.numel()):
        flat[begin : begin + block.numel()] = block[: flat.numel() - begin]


def _build(spec: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    shape, layers = spec["shape"], spec["layers"]
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if spec.get("transformers", True):
            try:
                from transformers import LlamaConfig, LlamaForCausalLM
            except ImportError:
                pass
            else:
                config = LlamaConfig(
                    hidden_size=shape["hidden"],
                    intermediate_size=shape["intermediate"],
                    num_attention_heads=shape["heads"],
                    num_key_value_heads=shape["kv_heads"],
                    num_hidden_layers=layers,
                    vocab_size=shape["vocab"],
                    max_position_embeddings=max(spec["tokens"]) + 1,
                )
                with torch.device(device):
                    return LlamaForCausalLM(config).eval()
        from offload_compiler.llama import LlamaShaped

        with torch.device(device):
            return LlamaShaped(
                layers,
                shape["hidden"],
                shape["heads"],
                shape["kv_heads"],
                shape["intermediate"],
                shape["vocab"],
            ).eval()
    finally:
        torch.set_default_dtype(previous)


def _layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.model.layers if hasattr(model, "model") else model.layers


def _call(model: torch.nn.Module):
    takes_cache = hasattr(model, "model")  # transformers: no KV cache for a single forward

    def run(ids: torch.Tensor) -> torch.Tensor:
        out = model(ids, use_cache=False) if takes_cache else model(ids)
        return out.logits if hasattr(out, "logits") else out

    return run


class Prepared(NamedTuple):
    """A cell's model, set up for its method."""

    call: Callable[[torch.Tensor], torch.Tensor]
    copies: Callable[[], tuple[int, list[torch.Tensor]]]
    """Bytes copied to the device per forward, and the host tensors they are copied from (for
    the copy floor; none where the method keeps them to itself). Asked after the first calls:
    the offload backend sets up its copies when it compiles."""


def offloaded_copies(model: torch.nn.Module) -> tuple[int, list[torch.Tensor]]:
    """What the offload backend copies per forward of ``model``, from its public record."""
    stacks = offload_compiler.offloaded_stacks(model)
    return sum(s.host_bytes for s in stacks), [t for s in stacks for t in s.host_tensors]


def uva_bytes(model: torch.nn.Module, cpu_offload_gb: float) -> int:
    """Bytes the UVA backend keeps in host memory: parameters in model order until the budget
    is reached, the last one crossing it (vLLM's rule, which the backend follows)."""
    budget, total = int(cpu_offload_gb * 2**30), 0
    for param in model.parameters():
        if total >= budget:
            break
        total += param.nbytes
    return total


def _inductor(model: torch.nn.Module, mode: str):
    return torch.compile(model, mode=None if mode == "default" else mode)


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def prepare(
    spec: dict, device: torch.device, dtype: torch.dtype, lock: GpuLock | None = None
) -> Prepared:
    """The model of the cell ``spec`` set up for its method, on ``device``."""
    method, mode = spec["method"], spec.get("mode", "default")
    if method in ("offload", "uva"):
        if method == "offload":
            options = {"prefetch": dict(spec["prefetch"])}
        else:
            options = {"uva": {"cpu_offload_gb": spec["uva_gb"], **spec.get("uva", {})}}
        if mode != "default":
            options["mode"] = mode
        # Built on the CPU and placed (offloaded weights to pinned host memory, the rest to the
        # GPU) before compiling, as a model too big for the GPU must be: the GPU never holds
        # more than the resident weights, so several cells fit on it at once.
        with lock.released() if lock else contextlib.nullcontext():  # the build uses no GPU
            model = build_model(spec, torch.device("cpu"), dtype)
        offload_compiler.place_model(model, options, device)
        _empty_cache(device)
        call = _call(torch.compile(model, backend="offload", options=options))
        if method == "offload":
            return Prepared(call, functools.partial(offloaded_copies, model))
        moved = uva_bytes(model, spec["uva_gb"])
        return Prepared(call, lambda: (moved, []))
    model = build_model(spec, device, dtype)
    if method == "resident":
        return Prepared(_call(_inductor(model, mode)), lambda: (0, []))
    if method == "hook":
        from benchmarks.hook_offloader import HookPrefetchOffloader

        p = spec["prefetch"]
        offloader = HookPrefetchOffloader(
            _layers(model),
            p["offload_group_size"],
            p["offload_num_in_group"],
            p["offload_prefetch_step"],
            device,
        )
        _empty_cache(device)
        copies = (offloader.offloaded_bytes, offloader.host_tensors)
        return Prepared(_call(_inductor(model, mode)), lambda: copies)
    if method == "accelerate":
        from accelerate import cpu_offload

        layers = _layers(model)
        config = offload_compiler.PrefetchOffloadConfig(**spec["prefetch"])
        chosen = config.offloaded_layers(len(layers))
        moved = sum(q.nbytes for i in chosen for q in layers[i].parameters())
        for i in chosen:
            cpu_offload(layers[i], execution_device=device)
        _empty_cache(device)
        return Prepared(_call(model), lambda: (moved, []))
    if method == "diffusers":
        from diffusers.hooks import apply_group_offloading

        moved = sum(q.nbytes for q in _layers(model).parameters())
        # Block-level grouping takes the ModuleList children of the module it is given, so
        # it gets a holder of the layer list (the list itself is never called).
        holder = torch.nn.Module()
        holder.layers = _layers(model)
        apply_group_offloading(
            holder,
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=True,
        )
        _empty_cache(device)
        return Prepared(_call(model), lambda: (moved, []))
    raise ValueError(f"unknown method {method!r}")


class GpuLock:
    """An exclusive file lock over GPU work, shared by the workers of one run.

    Held by a worker while it places its model and runs warm-up calls, released while it builds
    on the CPU and while Dynamo compiles (``torch._dynamo`` compile callbacks), and held by the
    measuring worker for all its timed runs, so no other cell's kernels or copies share the GPU
    with a measurement.
    """

    def __init__(self, path: Path) -> None:
        self.file = path.open("a")
        self.held = False

    def acquire(self, *_: object) -> None:
        if not self.held:
            fcntl.flock(self.file, fcntl.LOCK_EX)
            self.held = True

    def release(self, *_: object) -> None:
        if self.held:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.held = False

    @contextlib.contextmanager
    def released(self):
        self.release()
        try:
            yield
        finally:
            self.acquire()

    def release_while_compiling(self) -> None:
        from torch._dynamo.callback import callback_handler

        callback_handler.register_start_callback(self.release)
        callback_handler.register_end_callback(self.acquire)


def _progress(since: float, what: str) -> None:
    """A line in the cell's log (its stderr): where a slow or stuck cell got to."""
    print(f"[{time.perf_counter() - since:5.0f} s] {what}", file=sys.stderr, flush=True)


def run_cell(spec: dict, lock: GpuLock, go: Callable[[], None] | None = None) -> dict:
    """Prepare the cell (holding ``lock`` except while building and compiling), warm up every
    token count, then wait for ``go()`` (the parent's turn to measure) and time it holding
    ``lock``: the bandwidth probe and the copy floor before and after the timed runs."""
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    cores = sorted(os.sched_getaffinity(0))
    isolate = len(cores) >= 8  # two cores for the measuring worker, the rest for preparing
    if isolate:
        os.sched_setaffinity(0, cores[2:])  # threads and compile workers started now inherit it
    lock.release_while_compiling()
    lock.acquire()
    if spec.get("memory_fraction"):
        torch.cuda.set_per_process_memory_fraction(spec["memory_fraction"], device.index or 0)
    setup = time.perf_counter()
    inputs, moved, hosts, resident = {}, 0, [], 0
    if spec["method"] != "bandwidth":
        vocab = spec["shape"]["vocab"]
        inputs = {t: torch.randint(0, vocab, (1, t), device=device) for t in spec["tokens"]}
        before = torch.cuda.memory_allocated(device) if cuda else 0
        prepared = prepare(spec, device, dtype, lock)
        resident = torch.cuda.memory_allocated(device) - before if cuda else 0
        with torch.no_grad():
            for tokens, ids in inputs.items():  # compiles (and CUDA graph recordings)
                for _ in range(3):
                    prepared.call(ids)
                sync(device)
                _progress(setup, f"{tokens} tokens compiled and warmed up")
        moved, hosts = prepared.copies()
    setup_s = time.perf_counter() - setup
    lock.release()
    if go is not None:
        go()
    if isolate:
        os.sched_setaffinity(0, cores[:2])
    lock.acquire()
    if spec["method"] == "bandwidth":
        gbps = h2d_gbps(device, PROBE_BYTES)
        lock.release()
        return {**spec, "h2d_GBps": gbps}
    probes = [h2d_gbps(device, PROBE_BYTES)] if cuda else []
    floors = [copy_floor_ms(hosts, device)] if hosts else []
    results = []
    with torch.no_grad():
        for tokens, ids in inputs.items():
            if cuda:  # cached blocks nothing holds (the probe's, the floor's) leave first
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            call = functools.partial(prepared.call, ids)
            runs = time_calls({"cell": call}, device, spec["runs"], spec["min_run_s"])["cell"]
            ms = statistics.median(runs)
            results.append(
                {
                    "tokens": tokens,
                    "ms": ms,
                    "ms_runs": runs,
                    "peak_bytes": torch.cuda.max_memory_allocated(device) if cuda else 0,
                    # A CUDA graph's activations live in its memory pool, reserved since it was
                    # recorded (before this window) and not counted as allocated by its replays.
                    "peak_reserved_bytes": torch.cuda.max_memory_reserved(device) if cuda else 0,
                    "achieved_GBps": moved / (ms * 1e6) if moved else 0.0,
                }
            )
    probes += [h2d_gbps(device, PROBE_BYTES)] if cuda else []
    floors += [copy_floor_ms(hosts, device)] if hosts else []
    lock.release()
    return {
        **spec,
        "copied_bytes_per_forward": moved,
        "resident_bytes_after_setup": resident,
        "cell_h2d_GBps": statistics.mean(probes) if probes else None,
        "copy_floor_ms": statistics.mean(floors) if floors else None,
        "setup_s": setup_s,
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "results": results,
    }


# --- the grid, in the parent ------------------------------------------------------------------


def grid(args: argparse.Namespace) -> list[dict]:
    base = {
        "device": "cpu" if args.smoke else "cuda",
        "shape": SMOKE if args.smoke else LLAMA_8B,
        "layers": args.layers,
        "tokens": args.tokens,
        "runs": args.runs,
        "min_run_s": args.min_run_s,
        "transformers": not args.smoke,
    }
    cells: list[dict] = [] if args.smoke else [{**base, "method": "bandwidth"}]
    for mode in args.modes:
        if not args.no_resident:
            cells.append({**base, "method": "resident", "mode": mode})
        for prefetch in args.configs:
            cells.append({**base, "method": "offload", "mode": mode, "prefetch": prefetch})
        for prefetch in args.hook_configs:
            cells.append({**base, "method": "hook", "mode": mode, "prefetch": prefetch})
        for uva in args.uva:
            uva_options = {"use_unified_addressing": uva == "in-place"}
            cells.append(
                {**base, "method": "uva", "mode": mode, "uva_gb": args.uva_gb, "uva": uva_options}
            )
    for peer in args.peers:
        prefetch = {"offload_group_size": 2, "offload_num_in_group": 1, "offload_prefetch_step": 1}
        cells.append({**base, "method": peer, "mode": "eager", "prefetch": prefetch})
    if args.cap:
        prefetch = {"offload_group_size": 1, "offload_num_in_group": 1, "offload_prefetch_step": 2}
        cells.append(
            {
                **base,
                "method": "offload",
                "mode": "reduce-overhead",
                "prefetch": prefetch,
                "memory_fraction": args.cap,
                "label": "capped",
            }
        )
    return cells


def label(cell: dict) -> str:
    if cell.get("label"):
        return f"{cell['label']} {cell['method']}"
    p = cell.get("prefetch")
    if cell["method"] in ("offload", "hook"):
        text = (
            f"{cell['method']} {p['offload_group_size']}/{p['offload_num_in_group']} "
            f"step {p['offload_prefetch_step']}"
        )
        if cell["method"] == "offload" and "offload_per_param" in p:
            text += " per-param" if p["offload_per_param"] else " per-layer"
        return text
    if cell["method"] == "uva":
        return f"uva {'in-place' if cell['uva']['use_unified_addressing'] else 'copies'}"
    if cell["method"] == "accelerate":
        return f"accelerate {p['offload_group_size']}/{p['offload_num_in_group']}"
    if cell["method"] == "diffusers":
        return "diffusers all layers"
    return cell["method"]


def analyse(cells: list[dict]) -> list[dict]:
    """Attach the bound and ratio to every timed result.

    The copy term of the bound is the cell's copy floor where it measured one (its own copies
    back to back: exact bytes, its own pinned memory, taken around its timed runs), else its
    copied bytes over the bandwidth probe (`_cell_gbps`). A probe is one buffer copied at one
    moment: on a shared host one probe read 46 GB/s while the cell's floor before and after its
    runs read 55 GB/s, and a bound from that probe alone put the cell at 0.89 of it."""
    bandwidth = next((c["h2d_GBps"] for c in cells if c["method"] == "bandwidth"), None)
    compute = {
        (c["mode"], r["tokens"]): r["ms"]
        for c in cells
        if c["method"] == "resident" and "results" in c
        for r in c["results"]
    }
    for cell in cells:
        mode = cell.get("mode") or "default"
        gbps = _cell_gbps(cell, bandwidth)
        for r in cell.get("results", []):
            t_compute = compute.get((mode, r["tokens"]), compute.get(("default", r["tokens"])))
            copied = cell["copied_bytes_per_forward"] if cell["method"] != "uva" else 0
            copy_ms = copied / (gbps * 1e6) if gbps and copied else 0.0
            if copied and cell.get("copy_floor_ms"):
                copy_ms = cell["copy_floor_ms"]
            r["bound_ms"] = max(t_compute or 0.0, copy_ms)
            r["ratio"] = r["ms"] / r["bound_ms"] if r["bound_ms"] else None
    return cells


def _cell_gbps(cell: dict, bandwidth: float | None) -> float | None:
    """The H2D bandwidth a cell is compared against: measured around its own timed runs, else
    in its run (set by `merge`), else ``bandwidth``."""
    return cell.get("cell_h2d_GBps") or cell.get("run_h2d_GBps", bandwidth)


_METHOD_ORDER = ["resident", "offload", "hook", "uva", "accelerate", "diffusers"]


def _row_order(cell: dict) -> tuple:
    p = cell.get("prefetch") or {}
    return (
        cell.get("mode") != "default",
        bool(cell.get("label")),
        _METHOD_ORDER.index(cell["method"]) if cell["method"] in _METHOD_ORDER else 99,
        p.get("offload_prefetch_step", 0),
        p.get("offload_group_size", 0),
        not p.get("offload_per_param", True),
        label(cell),
    )


def markdown(cells: list[dict], command: str) -> str:
    timed = sorted((c for c in cells if c.get("results")), key=_row_order)
    bandwidth = next((c["h2d_GBps"] for c in cells if c["method"] == "bandwidth"), None)
    per_cell = sorted({g for c in timed if (g := _cell_gbps(c, None))})
    if per_cell:
        measured = f"{per_cell[0]:.1f}-{per_cell[-1]:.1f} GB/s, per cell (column GB/s)"
    else:
        measured = f"{bandwidth:.1f} GB/s" if bandwidth else "n/a"
    first = timed[0] if timed else {}
    tokens = first.get("tokens", [])
    lines = [
        f"Device: {first.get('device_name')}, torch {first.get('torch')}, "
        f"{first.get('layers')} layers of hidden {first.get('shape', {}).get('hidden')}. "
        f"Measured H2D bandwidth: {measured}.",
        f"Command: `{command}`",
        "",
        "Step time in ms (ratio to the bound max(T_compute, copy time)). floor ms: the "
        "cell's own copies back to back, nothing else running (from its own pinned memory, "
        "measured before and after its timed runs); the copy time of the bound is the floor "
        "where a cell has one, else copied bytes / the bandwidth probe (column GB/s):",
        "",
        "| method | mode | copied MB | GB/s | floor ms | "
        + " | ".join(f"{t} tok" for t in tokens)
        + " |",
        "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in tokens) + " |",
    ]
    for cell in timed:
        gbps = _cell_gbps(cell, bandwidth)
        row = [
            label(cell),
            str(cell.get("mode")),
            f"{cell['copied_bytes_per_forward'] / 1e6:.0f}",
            f"{gbps:.1f}" if gbps else "",
            f"{cell['copy_floor_ms']:.2f}" if cell.get("copy_floor_ms") else "",
        ]
        for r in cell["results"]:
            ratio = f" ({r['ratio']:.3f})" if r.get("ratio") else ""
            noisy = " †" if run_spread(r) > NOISY_SPREAD else ""
            row.append(f"{r['ms']:.2f}{ratio}{noisy}")
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        f"†: the cell's timed runs spread by more than {NOISY_SPREAD:.0%} (slowest / fastest): "
        "the machine changed under them (the other workers' compiles, another tenant's "
        "traffic on the host), so its median is not a reliable comparison.",
        "",
        "Memory (GB): allocated after setup (resident weights, slots); at the largest token "
        "count the peak allocated and the peak reserved by the caching allocator, which "
        "alone counts a CUDA graph's memory pool (empty for runs that did not record it)",
        "",
        "| method | mode | resident | peak | peak reserved |",
        "| --- | --- | --- | --- | --- |",
    ]
    for cell in timed:
        last = cell["results"][-1]
        memory = [cell.get("resident_bytes_after_setup"), last.get("peak_bytes")]
        memory.append(last.get("peak_reserved_bytes"))
        gigabytes = [f"{b / 1e9:.2f}" if b is not None else "" for b in memory]
        lines.append("| " + " | ".join([label(cell), str(cell.get("mode")), *gigabytes]) + " |")
    failed = [c for c in cells if c.get("error")]
    if failed:
        lines += ["", "Cells that failed:", ""]
        lines += [f"- {label(c)} ({c.get('mode')}): {c['error']}" for c in failed]
    return "\n".join(lines) + "\n"


def run_spread(result: dict) -> float:
    """Slowest over fastest of a result's timed runs, minus 1."""
    runs = result.get("ms_runs") or [result["ms"]]
    return max(runs) / min(runs) - 1


def plot(cells: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({c["mode"] for c in cells if c.get("results")})
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 5), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        for cell in cells:
            if cell.get("mode") != mode or not cell.get("results"):
                continue
            xs = [r["tokens"] for r in cell["results"]]
            ax.plot(xs, [r["ms"] for r in cell["results"]], marker="o", label=label(cell))
            if cell["method"] == "offload":
                ax.plot(xs, [r["bound_ms"] for r in cell["results"]], "k:", alpha=0.4)
        ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="ms per forward", title=mode)
        ax.legend(fontsize=6)
    fig.suptitle("step time vs tokens (dotted: bound of each offload config)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


class _Worker:
    """One cell's process: it prints ``READY`` when prepared, waits for ``GO`` on stdin, then
    prints its ``CELL`` line."""

    def __init__(self, spec: dict, lock: Path, log: Path, events: queue.Queue) -> None:
        self.spec, self.began, self.result = spec, time.perf_counter(), None
        self.log = log.open("w")
        env = {
            **os.environ,
            "TORCHINDUCTOR_COMPILE_THREADS": os.environ.get("TORCHINDUCTOR_COMPILE_THREADS", "4"),
        }
        worker = ["--worker", json.dumps(spec), "--lock", str(lock)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.offload_bench", *worker],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
            start_new_session=True,  # its own process group, compile workers included
        )
        threading.Thread(target=self._read, args=(events,), daemon=True).start()

    def _read(self, events: queue.Queue) -> None:
        for line in self.proc.stdout:
            events.put((self, line.rstrip("\n")))
        self.proc.wait()
        self.log.close()
        events.put((self, None))

    def go(self) -> None:
        self.proc.stdin.write("GO\n")
        self.proc.stdin.flush()

    def elapsed(self) -> float:
        return time.perf_counter() - self.began


def run_grid(cells: list[dict], out: Path, jobs: int, timeout: float, deadline: float) -> list:
    """Run every cell in its own worker, ``jobs`` at a time, one measuring at a time; write
    ``results.json`` after each cell, so a run cut short keeps what it measured. No worker
    starts ``deadline`` seconds after the first (the rest are listed as not run)."""
    began = time.perf_counter()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    lock = out / ".gpu.lock"
    events: queue.Queue = queue.Queue()
    todo = deque(enumerate(cells))
    running: dict[_Worker, int] = {}
    ready: deque[_Worker] = deque()
    measuring: _Worker | None = None
    done: dict[int, dict] = {}
    while todo or running:
        if todo and time.perf_counter() - began > deadline:
            print(
                f"deadline: {len(todo)} cells not run: "
                + ", ".join(label(spec) + " " + spec.get("mode", "") for _, spec in todo)
            )
            todo.clear()
        while todo and len(running) < jobs:
            index, spec = todo.popleft()
            worker = _Worker(spec, lock, out / "logs" / f"cell{index:03d}.log", events)
            running[worker] = index
        try:
            worker, line = events.get(timeout=5)
        except queue.Empty:
            worker, line = None, None
        if worker is not None and line == "READY":
            ready.append(worker)
        elif worker is not None and line is not None and line.startswith("CELL "):
            worker.result = json.loads(line[5:])
        elif worker is not None and line is None:  # the worker exited
            cell = worker.result or {**worker.spec, "error": _tail(worker.log.name)}
            done[running.pop(worker)] = cell
            if measuring is worker:
                measuring = None
            if worker in ready:
                ready.remove(worker)
            status = cell.get("error") or " ".join(
                f"{r['tokens']}:{r['ms']:.2f}" for r in cell.get("results", [])
            )
            print(
                f"[{worker.elapsed():5.0f} s] {label(cell)} {cell.get('mode', '')}: {status}",
                flush=True,
            )
            (out / "results.json").write_text(json.dumps(analyse(_ordered(done)), indent=1))
        for worker in list(running):
            if worker.elapsed() > timeout and worker.proc.poll() is None:
                worker.result = {**worker.spec, "error": f"timed out after {timeout:.0f} s"}
                worker.proc.send_signal(signal.SIGUSR1)  # its stacks into its log (faulthandler)
                time.sleep(1)
                os.killpg(worker.proc.pid, signal.SIGKILL)
        if measuring is None and ready:
            measuring = ready.popleft()
            measuring.go()
    return analyse(_ordered(done))


def _ordered(done: dict[int, dict]) -> list[dict]:
    return [done[i] for i in sorted(done)]


def _tail(path: str) -> str:
    return Path(path).read_text()[-500:]


def worker_main(spec: dict, lock_path: Path) -> int:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent's timeout asks

    def go() -> None:
        print("READY", flush=True)
        if sys.stdin.readline().strip() != "GO":
            raise SystemExit("the parent went away")

    try:
        result = run_cell(spec, GpuLock(lock_path), go)
    except Exception as err:  # a failed cell is reported, not fatal to the grid
        result = {**spec, "error": f"{type(err).__name__}: {err}"[:500]}
    print("CELL " + json.dumps(result), flush=True)
    return 0


def write_outputs(cells: list[dict], out: Path, command: str) -> None:
    (out / "results.json").write_text(json.dumps(cells, indent=1))
    (out / "results.md").write_text(markdown(cells, command))
    plot(cells, out / "results.png")


def merge(dirs: list[Path]) -> list[dict]:
    """The cells of several runs (possibly on different machines of one kind) as one grid;
    each cell's bound uses the bandwidth measured in its own run. A merged grid merges again
    unchanged: its cells keep the run they came from."""
    cells = []
    for directory in dirs:
        run = json.loads((directory / "results.json").read_text())
        gbps = next((c["h2d_GBps"] for c in run if c["method"] == "bandwidth"), None)
        for cell in run:
            if cell["method"] != "bandwidth":
                cells.append({"run": directory.name, "run_h2d_GBps": gbps, **cell})
    return analyse(cells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run (CI)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--lock", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--merge", type=Path, nargs="+", metavar="DIR", help="join the results.json of these runs"
    )
    parser.add_argument("--layers", type=int)
    parser.add_argument("--tokens", type=parse_ints, help="token counts, e.g. 1,16,2048")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per token count")
    parser.add_argument("--min-run-s", type=float, default=0.5, help="shortest timed run")
    parser.add_argument("--jobs", type=int, default=3, help="cells prepared at once")
    parser.add_argument("--modes", type=parse_modes, help="Inductor modes: " + ",".join(MODES))
    parser.add_argument(
        "--configs", type=parse_configs, help="group/num/step[:pp|:layer],... e.g. 2/1/1:pp,1/1/2"
    )
    parser.add_argument(
        "--hook-configs", type=parse_configs, help="as --configs, for the hook baseline"
    )
    parser.add_argument(
        "--uva", type=lambda s: [u for u in s.split(",") if u], help="copies,in-place"
    )
    parser.add_argument("--uva-gb", type=float, default=1.0, help="UVA cells' cpu_offload_gb")
    parser.add_argument(
        "--peers",
        type=lambda s: [p for p in s.split(",") if p],
        default=[],
        help="other offloaders: accelerate,diffusers",
    )
    parser.add_argument("--cap", type=float, help="memory fraction for a capped run")
    parser.add_argument("--no-resident", action="store_true", help="T_compute from --merge")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    parser.add_argument("--deadline", type=float, default=1e9, help="no cell starts after it")
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(json.loads(args.worker), args.lock)
    if args.out is None:
        parser.error("--out is required")
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.offload_bench " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    if args.merge:
        cells = merge(args.merge)
    else:
        _defaults(args)
        cells = run_grid(grid(args), args.out, args.jobs, args.timeout, args.deadline)
    write_outputs(cells, args.out, command)
    print((args.out / "results.md").read_text())
    return 0


def _defaults(args: argparse.Namespace) -> None:
    if args.smoke:
        args.layers = args.layers or 4
        args.tokens = args.tokens or [4, 16]
        args.modes = args.modes or ["default"]
        args.configs = args.configs or parse_configs("1/1/1,2/1/2,2/1/1:pp")
        args.hook_configs = (
            parse_configs("2/1/2") if args.hook_configs is None else args.hook_configs
        )
        args.uva = ["copies"] if args.uva is None else args.uva
        args.uva_gb = 2e-4
        args.runs, args.min_run_s, args.jobs = 2, 0.05, 2
    else:
        args.layers = args.layers or 32
        args.tokens = args.tokens or [1, 16, 256, 2048, 8192]
        args.modes = args.modes or ["default", "reduce-overhead"]
        args.hook_configs = args.hook_configs or []
        args.uva = args.uva or []
        if args.configs is None:
            args.configs = parse_configs(
                ",".join(f"{g}/1/{s}" for g in (1, 2, 4, 8) for s in (1, 2, 4))
            )


def parse_modes(text: str) -> list[str]:
    """Comma-separated Inductor modes (``default,reduce-overhead``)."""
    modes = text.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    return modes


def parse_ints(text: str) -> list[int]:
    """Comma-separated integers (``--tokens 1,16,2048``)."""
    return [int(t) for t in text.split(",")]


def parse_configs(text: str) -> list[dict]:
    """``group/num/step`` items, comma-separated, each optionally suffixed ``:pp`` (per-parameter
    streaming on) or ``:layer`` (off); without a suffix the package default applies."""
    configs = []
    for item in filter(None, text.split(",")):
        numbers, _, streaming = item.partition(":")
        group, num, step = (int(x) for x in numbers.split("/"))
        prefetch = {
            "offload_group_size": group,
            "offload_num_in_group": num,
            "offload_prefetch_step": step,
        }
        if streaming:
            if streaming not in ("pp", "layer"):
                raise argparse.ArgumentTypeError(f"unknown suffix :{streaming} in {item!r}")
            prefetch["offload_per_param"] = streaming == "pp"
        configs.append(prefetch)
    return configs


if __name__ == "__main__":
    raise SystemExit(main())
