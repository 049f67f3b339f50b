"""Offloaded step time against the physical bound and against other offloaders.

    python -m benchmarks.offload_bench --out DIR            # on a CUDA machine
    python -m benchmarks.offload_bench --smoke --out DIR    # tiny CPU run (CI)

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
bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import fcntl
import json
import math
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

import offload_compiler.runtime as offload_runtime
from benchmarks import pinned_pages, slot_placement
from offload_compiler.config import PrefetchOffloadConfig
from offload_compiler.demo import h2d_gbps

LLAMA_8B = {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "vocab": 128256}
PROBE_BYTES = 512 * 2**20  # one pinned host-to-device copy of the bandwidth probe
NOISY_SPREAD = 0.05  # timed runs of a cell that differ more than this are flagged
SMOKE = {"hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 2, "vocab": 256}


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


MODE_FLAGS = {
    "static": "every token count compiled as a graph of static shape (torch.compile "
    "dynamic=False), not one graph of dynamic shape from the second on",
    "captured": "prefetch.offload_host_copies=False: CUDA graphs capture the copies (offload "
    "cells only)",
    "rejoin": "prefetch.offload_capturable=True: the CUDA-graph schedule (copies joined at the "
    "end, next-call copies at the top) in any mode (offload cells only)",
    "hugepages": "after warm-up, the host copies move into pinned memory backed by 2 MiB huge "
    "pages (benchmarks.pinned_pages; offload cells with host copies only)",
    "repinned": "after warm-up, the host copies move into fresh pinned memory from PyTorch's "
    "allocator: the control for +hugepages (same work, the driver's pages)",
}


def base_mode(mode: str) -> str:
    """The Inductor mode of a benchmark mode ``MODE[+FLAG...][.N]``: ``reduce-overhead.2`` is a
    second model compiled in ``reduce-overhead`` (paired cells time several models of one mode,
    since two models of one configuration and mode can differ in step time by more than two
    modes do), ``reduce-overhead+static`` a model compiled otherwise (`MODE_FLAGS`)."""
    return mode.partition(".")[0].partition("+")[0]


def mode_flags(mode: str) -> set[str]:
    """The `MODE_FLAGS` of a benchmark mode (``reduce-overhead+static+captured.2``)."""
    flags = set(mode.partition(".")[0].split("+")[1:])
    if not flags <= MODE_FLAGS.keys():
        raise ValueError(f"mode {mode!r}: unknown flags {sorted(flags - MODE_FLAGS.keys())}")
    return flags


def make_room_for_graphs(models: int, token_counts: int) -> None:
    """Raise Dynamo's recompile limit for ``models`` models of one class in one process: their
    graphs are entries of one Dynamo frame (the model's forward), a static and a dynamic graph
    per model, or one per token count under +static."""
    torch._dynamo.config.recompile_limit = max(
        torch._dynamo.config.recompile_limit, models * (token_counts + 1)
    )


def _compile(
    model: torch.nn.Module, mode: str, flags: set[str], options: dict[str, Any] | None = None
):
    """``torch.compile`` of ``model`` in Inductor mode ``mode``, by the offload backend with
    ``options`` (which carry the mode) where given, else by Inductor, as ``flags`` say."""
    dynamic = False if "static" in flags else None
    if options is not None:
        return torch.compile(model, backend="offload", options=options, dynamic=dynamic)
    return torch.compile(model, mode=None if mode == "default" else mode, dynamic=dynamic)


def prepare(spec: dict, device: torch.device, dtype: torch.dtype, lock: GpuLock):
    """The model set up for the cell's method: (callable, bytes copied per forward, the pinned
    host tensors it copies from, empty where the method keeps them to itself)."""
    from offload_compiler.pool import host_copy

    method, mode = spec["method"], base_mode(spec.get("mode", "default"))
    flags = mode_flags(spec.get("mode", "default"))
    if method in ("offload", "uva"):
        import offload_compiler

        if method == "offload":
            options = {"prefetch": dict(spec["prefetch"])}
            if "captured" in flags:
                options["prefetch"]["offload_host_copies"] = False
            if "rejoin" in flags:
                options["prefetch"]["offload_capturable"] = True
        else:
            options = {"uva": {"cpu_offload_gb": spec["uva_gb"], **spec.get("uva", {})}}
        if mode != "default":
            options["mode"] = mode
        # Built on the CPU and placed (offloaded weights to pinned host memory, the rest to the
        # GPU) before compiling, as a model too big for the GPU must be: the GPU never holds
        # more than the resident weights, so several cells fit on it at once.
        lock.release()  # the CPU build uses no GPU
        model = build_model(spec, torch.device("cpu"), dtype)
        lock.acquire()
        offload_compiler.place_model(model, options, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        hosts = [h for h in map(host_copy, model.parameters()) if h is not None]
        moved = sum(h.nbytes for h in hosts)
        compiled = _compile(model, mode, flags, options=options)
        return _call(compiled), moved, hosts if method == "offload" else []
    model = build_model(spec, device, dtype)
    if method == "resident":
        return _call(_compile(model, mode, flags)), 0, []
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
        if device.type == "cuda":
            torch.cuda.empty_cache()
        compiled = _compile(model, mode, flags)
        hosts = [t for host in offloader.hosts for t in host.values()]
        return _call(compiled), offloader.offloaded_bytes, hosts
    if method == "accelerate":
        from accelerate import cpu_offload

        layers = _layers(model)
        chosen = PrefetchOffloadConfig(**spec["prefetch"]).offloaded_layers(len(layers))
        moved = sum(q.nbytes for i in chosen for q in layers[i].parameters())
        for i in chosen:
            cpu_offload(layers[i], execution_device=device)
        torch.cuda.empty_cache()
        return _call(model), moved, []
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
        torch.cuda.empty_cache()
        return _call(model), moved, []
    raise ValueError(f"unknown method {method!r}")


class GpuLock:
    """An exclusive file lock over GPU work, shared by the workers of one run.

    Held by a worker while it builds its model and runs warm-up calls, released while Dynamo
    compiles (``torch._dynamo`` compile callbacks), and held by the measuring worker for all its
    timed runs, so no other cell's kernels or copies share the GPU with a measurement.
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

    def release_while_compiling(self) -> None:
        from torch._dynamo.callback import callback_handler

        callback_handler.register_start_callback(self.release)
        callback_handler.register_end_callback(self.acquire)


def time_calls(
    calls: dict[str, object], ids: torch.Tensor, cuda: bool, runs: int, min_run_s: float
) -> dict[str, list[float]]:
    """ms per call of each callable in ``calls``: ``runs`` runs of back-to-back calls each, the
    callables taking turns run by run (so a drift of the machine, such as its H2D bandwidth,
    reaches all alike), each run at least ``min_run_s`` long (and at least 3 calls), between
    two device-wide syncs: a sync per call, or an end event on the compute stream alone, would
    leave the copies started for the next call outside the timed window."""

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def run(call, count: int) -> float:
        sync()
        begin = time.perf_counter()
        for _ in range(count):
            call(ids)
        sync()
        return (time.perf_counter() - begin) * 1e3 / count

    counts = {name: max(3, math.ceil(min_run_s * 1e3 / run(c, 1))) for name, c in calls.items()}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(runs):
        for name, call in calls.items():
            times[name].append(run(call, counts[name]))
    return times


def copy_floor_ms(hosts: list[torch.Tensor], device: torch.device, repeats: int = 3) -> float:
    """ms to copy ``hosts`` to the device back to back on one stream, nothing else running:
    the floor of a forward that copies them, from the very pinned memory it copies from.

    Unlike the bandwidth probe (one 512 MiB buffer of its own, copied once), it moves exactly
    the cell's bytes in the cell's tensor sizes, and is taken right around the cell's timed
    runs: on a shared host the H2D bandwidth moves by several percent within minutes.
    """
    flat = [h.reshape(-1).view(torch.uint8) for h in hosts]
    scratch = torch.empty(max(f.numel() for f in flat), dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)

    def once() -> float:
        begin = time.perf_counter()
        with torch.cuda.stream(stream):
            for f in flat:
                scratch[: f.numel()].copy_(f, non_blocking=True)
        stream.synchronize()
        return (time.perf_counter() - begin) * 1e3

    torch.cuda.synchronize(device)
    once()
    return statistics.median(once() for _ in range(repeats))


def _progress(since: float, what: str) -> None:
    """A line in the cell's log (its stderr): where a slow or stuck cell got to."""
    print(f"[{time.perf_counter() - since:5.0f} s] {what}", file=sys.stderr, flush=True)


def _placement(runtime) -> dict:
    """`slot_placement.runtime_placement`, or the error that stopped it: a diagnostic must not
    cost a cell its timings."""
    try:
        return slot_placement.runtime_placement(runtime)
    except Exception as error:  # recorded in the cell's results instead
        return {"error": repr(error)}


def run_cell(spec: dict, lock: GpuLock, go=None, measuring=None) -> list[dict]:
    """Prepare the cell (holding ``lock`` except while compiling), warm up every token count,
    then wait for ``go()`` (the parent's turn to measure) and time it holding ``lock``
    (``measuring()`` once it holds it).

    A cell with ``modes`` (more than one) builds one model per mode in this process and times
    them in turns: its results compare the modes free of drift between processes. It returns
    one result per mode; their memory is not reported (the models share the GPU).
    """
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
    modes = spec.get("modes") or [spec.get("mode", "default")]
    prepared: dict[str, tuple] = {}
    runtimes: dict[str, list] = {}
    slots: dict[str, list[dict]] = {}
    weights: dict[str, dict] = {}
    inputs = {}
    if spec["method"] != "bandwidth":
        for tokens in spec["tokens"]:
            inputs[tokens] = torch.randint(0, spec["shape"]["vocab"], (1, tokens), device=device)
        make_room_for_graphs(len(modes), len(inputs))
        for mode in modes:
            before = torch.cuda.memory_allocated(device) if cuda else 0
            known = len(offload_runtime._RUNTIMES)
            if cuda and spec.get("fresh_memory"):
                torch.cuda.empty_cache()  # what earlier models freed goes back to the driver
            snapshot = torch.cuda.memory_snapshot() if cuda else None
            call, moved, hosts = prepare({**spec, "mode": mode}, device, dtype, lock)
            if cuda:  # where its weights went: segments an earlier model freed, or new ones
                weights[mode] = slot_placement.blocks_since(snapshot, torch.cuda.memory_snapshot())
            resident = torch.cuda.memory_allocated(device) - before if cuda else 0
            with torch.no_grad():
                for tokens, ids in inputs.items():  # compiles (and CUDA graph recordings)
                    for _ in range(3):
                        call(ids)
                    if cuda:
                        torch.cuda.synchronize()
                    _progress(setup, f"{mode}: {tokens} tokens compiled and warmed up")
            runtimes[mode] = offload_runtime._RUNTIMES[known:]
            if mode_flags(mode) & {"hugepages", "repinned"}:
                for runtime in runtimes[mode]:
                    hosts = pinned_pages.rehome_as_flagged(runtime, mode_flags(mode))
                _progress(setup, f"{mode}: host copies {pinned_pages.huge_page_share(hosts)}")
            prepared[mode] = (call, moved, resident, hosts)
        if cuda:
            torch.cuda.synchronize()
            # Where each model's slot buffers lie as the timing starts, to set beside its times:
            # session 16's "a model built after another is slower" (slot_placement's docstring).
            slots = {mode: [_placement(r) for r in rs] for mode, rs in runtimes.items()}
    setup_s = time.perf_counter() - setup
    lock.release()
    if go is not None:
        go()
    if isolate:
        os.sched_setaffinity(0, cores[:2])
    lock.acquire()
    if measuring is not None:
        measuring()
    if spec["method"] == "bandwidth":
        return [{**spec, "h2d_GBps": h2d_gbps(device, PROBE_BYTES)}]
    gbps_before = h2d_gbps(device, PROBE_BYTES) if cuda else None
    floors: dict[str, list[float]] = {mode: [] for mode in modes if cuda and prepared[mode][3]}
    for mode in floors:
        floors[mode].append(copy_floor_ms(prepared[mode][3], device))
    results: dict[str, list[dict]] = {mode: [] for mode in modes}
    with torch.no_grad():
        for tokens, ids in inputs.items():
            if cuda:  # cached blocks nothing holds (the probe's, the floor's) leave first
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            turns = modes[::-1] if spec.get("reverse_turns") else modes
            calls = {mode: prepared[mode][0] for mode in turns}
            times = time_calls(calls, ids, cuda, spec.get("runs", 5), spec.get("min_run_s", 0.5))
            peak = peak_reserved = None  # the models of a paired cell share the GPU
            if len(modes) == 1:
                peak = torch.cuda.max_memory_allocated(device) if cuda else 0
                # A CUDA graph's activations live in its memory pool, reserved since it was
                # recorded (before this window) and not counted as allocated by its replays.
                peak_reserved = torch.cuda.max_memory_reserved(device) if cuda else 0
            for mode in modes:
                ms, moved = statistics.median(times[mode]), prepared[mode][1]
                results[mode].append(
                    {
                        "tokens": tokens,
                        "ms": ms,
                        "ms_runs": times[mode],
                        "peak_bytes": peak,
                        "peak_reserved_bytes": peak_reserved,
                        "achieved_GBps": moved / (ms * 1e6) if moved else 0.0,
                    }
                )
    gbps_after = h2d_gbps(device, PROBE_BYTES) if cuda else None
    for mode in floors:
        floors[mode].append(copy_floor_ms(prepared[mode][3], device))
    lock.release()
    return [
        {
            **spec,
            "mode": mode,
            "paired": len(modes) > 1,
            "copied_bytes_per_forward": prepared[mode][1],
            "resident_bytes_after_setup": prepared[mode][2] if len(modes) == 1 else None,
            "cell_h2d_GBps": (gbps_before + gbps_after) / 2 if cuda else None,
            "copy_floor_ms": statistics.mean(floors[mode]) if mode in floors else None,
            "setup_s": setup_s,
            "slots": slots.get(mode),
            "weights_placement": weights.get(mode),
            "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
            "torch": torch.__version__,
            "results": results[mode],
        }
        for mode in modes
    ]


# --- the grid, in the parent ------------------------------------------------------------------


def grid(args: argparse.Namespace) -> list[dict]:
    device = "cpu" if args.smoke else "cuda"
    shape = SMOKE if args.smoke else LLAMA_8B
    base = {
        "device": device,
        "shape": shape,
        "layers": args.layers,
        "tokens": args.tokens,
        "runs": args.runs,
        "min_run_s": args.min_run_s,
        "transformers": not args.smoke,
        "reverse_turns": args.reverse_turns,
        "fresh_memory": args.fresh_memory,
    }
    cells: list[dict] = [] if args.smoke else [{**base, "method": "bandwidth"}]
    if args.paired:  # one cell per configuration, its modes timed in turns in one process
        # A model built later in a process can copy slower than the one built before it
        # (docs/benchmarks.md, session 16): --both-orders builds the modes in both orders.
        orders = [args.modes, args.modes[::-1]] if args.both_orders else [args.modes]
        for method, configs in (("offload", args.configs), ("hook", args.hook_configs)):
            for prefetch in configs:
                for modes in orders:
                    cells.append({**base, "method": method, "modes": modes, "prefetch": prefetch})
    for mode in args.modes:
        if not args.no_resident:
            cells.append({**base, "method": "resident", "mode": mode})
        for prefetch in [] if args.paired else args.configs:
            cells.append({**base, "method": "offload", "mode": mode, "prefetch": prefetch})
        for prefetch in [] if args.paired else args.hook_configs:
            cells.append({**base, "method": "hook", "mode": mode, "prefetch": prefetch})
        for uva in args.uva:
            cells.append(
                {
                    **base,
                    "method": "uva",
                    "mode": mode,
                    "uva_gb": args.uva_gb,
                    "uva": {"use_unified_addressing": uva == "in-place"},
                }
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
        if cell.get("paired"):  # the models of a paired cell are built in the order of modes
            text += f" paired, {cell['modes'][0]} first" if cell.get("modes") else " paired"
            text += ", turns reversed" if cell.get("reverse_turns") else ""
            text += ", fresh memory" if cell.get("fresh_memory") else ""
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
    copied bytes over the bandwidth probe (`_cell_gbps`). A probe is one 512 MiB copy at one
    moment, and on a shared host one probe read 46 GB/s while the cell's floor before and after
    its runs read 55 GB/s: a bound from that probe alone put the cell at 0.89 of it."""
    bandwidth = next((c["h2d_GBps"] for c in cells if c["method"] == "bandwidth"), None)
    compute = {
        (c["mode"], r["tokens"]): r["ms"]
        for c in cells
        if c["method"] == "resident" and "results" in c
        for r in c["results"]
    }
    for cell in cells:
        mode = base_mode(cell.get("mode") or "default")
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
        "the machine changed under them (other workers' compiles before --quiet, another "
        "tenant's traffic on the host), so its median is not a reliable comparison.",
    ]
    lines += _paired_table(timed)
    lines += [
        "",
        "Memory (GB): allocated after setup (resident weights, slots); at the largest token "
        "count the peak allocated and the peak reserved by the caching allocator, which "
        "alone counts a CUDA graph's memory pool (empty for runs that did not record it)",
        "",
        "| method | mode | resident | peak | peak reserved |",
        "| --- | --- | --- | --- | --- |",
    ]
    for cell in timed:
        if cell.get("paired"):
            continue  # the models of a paired cell share the GPU
        last = cell["results"][-1]
        reserved = last.get("peak_reserved_bytes")
        lines.append(
            f"| {label(cell)} | {cell.get('mode')} | "
            f"{cell['resident_bytes_after_setup'] / 1e9:.2f} | {last['peak_bytes'] / 1e9:.2f} | "
            + (f"{reserved / 1e9:.2f} |" if reserved is not None else "|")
        )
    lines += _placement_rows(timed)
    failed = [c for c in cells if c.get("error")]
    if failed:
        lines += ["", "Cells that failed:", ""]
        lines += [f"- {label(c)} ({c.get('mode')}): {c['error']}" for c in failed]
    return "\n".join(lines) + "\n"


def _placement_rows(timed: list[dict]) -> list[str]:
    """Where each CUDA model's memory went (session 17's suspect for a model built after
    another running slower): its weights, into segments an earlier model freed or into new
    ones, and its slot buffers, alone in their segments or beside other blocks."""
    placed = [c for c in timed if c.get("weights_placement") or c.get("slots")]
    if not placed:
        return []
    lines = [
        "",
        "Where each model's memory went: MB of blocks its placement (before its warm-up) "
        "put into segments the process had before (freed by an earlier model) and into new "
        "ones; its slot buffers as its timing started, and how many have a segment to "
        "themselves:",
        "",
        "| method | mode | weights into reused segments | into new segments | slot buffers | "
        "alone |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for cell in placed:
        weights = cell.get("weights_placement") or {}
        slots = [p for p in cell.get("slots") or [] if "error" not in p]
        row = [label(cell), str(cell.get("mode"))]
        for key in ("recycled_bytes", "fresh_bytes"):
            row.append(f"{weights[key] / 1e6:.0f}" if key in weights else "")
        for key in ("buffers", "alone_in_segment"):
            row.append(str(sum(p[key] for p in slots)) if slots else "")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def run_spread(result: dict) -> float:
    """Slowest over fastest of a result's timed runs, minus 1."""
    runs = result.get("ms_runs") or [result["ms"]]
    return max(runs) / min(runs) - 1


def _paired_table(timed: list[dict]) -> list[str]:
    """Paired cells (modes timed in turns in one process): each mode against the first, as the
    median over runs of (this mode's run / the first mode's run of the same turn) - 1; where a
    configuration ran in both build orders, also the mean of the two orders' medians."""
    pairs: dict[str, list[dict]] = {}
    for cell in timed:
        if cell.get("paired"):
            key = [cell.get("run"), cell["method"], cell.get("prefetch"), cell.get("modes")]
            key = json.dumps(key)
            pairs.setdefault(key, []).append(cell)
    if not pairs:
        return []
    tokens = next(iter(pairs.values()))[0]["tokens"]
    lines = [
        "",
        "Paired cells, timed in turns in one process: step time of each mode, and how much "
        "slower than the first mode (median over turns of the per-turn ratio - 1):",
        "",
        "| method | modes | " + " | ".join(f"{t} tok" for t in tokens) + " |",
        "| --- | --- | " + " | ".join("---" for _ in tokens) + " |",
    ]
    # (run, method, prefetch, other mode, base mode) -> per order, the medians per token count
    orders: dict[str, list[list[float]]] = {}
    for cells in pairs.values():
        base = cells[0]
        for other in cells[1:]:
            modes = f"{other['mode']} vs {base['mode']}"
            if other.get("copy_floor_ms") and base.get("copy_floor_ms"):
                modes += f" (floors {other['copy_floor_ms']:.2f} vs {base['copy_floor_ms']:.2f})"
            row = [label(base), modes]
            medians = []
            for b, o in zip(base["results"], other["results"], strict=True):
                turns = [x / y - 1 for x, y in zip(o["ms_runs"], b["ms_runs"], strict=True)]
                medians.append(statistics.median(turns))
                row.append(f"{o['ms']:.2f} vs {b['ms']:.2f} ({medians[-1]:+.1%})")
            lines.append("| " + " | ".join(row) + " |")
            key = json.dumps(
                [base.get("run"), base["method"], base.get("prefetch"), other["mode"], base["mode"]]
            )
            orders.setdefault(key, []).append(medians)
        lines += _mode_group_rows(cells)
    for key, per_order in orders.items():
        if len(per_order) > 1:  # both build orders: what the order adds cancels in the mean
            _, method, prefetch, other, base = json.loads(key)
            name = label({"method": method, "prefetch": prefetch})
            means = [statistics.mean(m) for m in zip(*per_order, strict=True)]
            row = [f"{name} paired", f"{other} vs {base}, mean of {len(per_order)} build orders"]
            lines.append("| " + " | ".join(row + [f"({m:+.1%})" for m in means]) + " |")
    return lines + _first_built_rows(pairs.values())


def _first_built_rows(pairs: Iterable[list[dict]]) -> list[str]:
    """Where a configuration ran in both build orders: each mode as the first model of its
    process (what a process serving one model sees, and how unpaired cells run), its ratio to
    its own bound against the base mode's (the mode the rows above compare with). Across two
    processes, so not paired by turn, but free of the penalty a model built second can pay
    (docs/benchmarks.md, sessions 16-18)."""
    first: dict[str, dict[str, dict]] = {}  # (run, method, prefetch) -> mode -> its cell
    for cells in pairs:
        for cell in cells:
            if cell.get("modes") and cell["mode"] == cell["modes"][0]:  # built first
                key = json.dumps([cell.get("run"), cell["method"], cell.get("prefetch")])
                first.setdefault(key, {})[cell["mode"]] = cell
    rows = []
    for by_mode in first.values():
        (base_name, base), *others = by_mode.items()
        for other_name, other in others:
            row = [
                f"{label({'method': base['method'], 'prefetch': base['prefetch']})} paired",
                f"{other_name} vs {base_name}, each built first (ratio to its bound)",
            ]
            for b, o in zip(base["results"], other["results"], strict=True):
                if b.get("ratio") and o.get("ratio"):
                    ratios = f"{o['ratio']:.3f} vs {b['ratio']:.3f}"
                    row.append(f"{ratios} ({o['ratio'] / b['ratio'] - 1:+.1%})")
                else:
                    row.append("")
            rows.append("| " + " | ".join(row) + " |")
    return rows


def _mean_turns(models: list[dict], result: int) -> list[float]:
    """Per turn, the mean step time of ``models`` at their ``result``-th token count."""
    runs = zip(*(m["results"][result]["ms_runs"] for m in models), strict=True)
    return [statistics.mean(turn) for turn in runs]


def _mode_group_rows(cells: list[dict]) -> list[str]:
    """Where a paired cell has several models of one mode: each mode against the first, as
    the median over turns of (mean step time of its models / that of the first mode's) - 1."""
    groups: dict[str, list[dict]] = {}
    for cell in cells:
        groups.setdefault(cell["mode"].partition(".")[0], []).append(cell)
    if all(len(g) == 1 for g in groups.values()):
        return []
    (base_name, base), *others = groups.items()
    rows = []
    for name, group in others:
        row = [label(cells[0]), f"{name} ({len(group)} models) vs {base_name} ({len(base)} models)"]
        for i in range(len(base[0]["results"])):
            other_ms, base_ms = _mean_turns(group, i), _mean_turns(base, i)
            turns = [x / y - 1 for x, y in zip(other_ms, base_ms, strict=True)]
            row.append(
                f"{statistics.median(other_ms):.2f} vs {statistics.median(base_ms):.2f} "
                f"({statistics.median(turns):+.1%})"
            )
        rows.append("| " + " | ".join(row) + " |")
    return rows


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
        self.spec, self.began, self.results = spec, time.perf_counter(), []
        self.log = log.open("w")
        env = {
            **os.environ,
            "TORCHINDUCTOR_COMPILE_THREADS": os.environ.get("TORCHINDUCTOR_COMPILE_THREADS", "4"),
        }
        self.paused_s, self._paused_at = 0.0, None
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.offload_bench",
                "--worker",
                json.dumps(spec),
                "--lock",
                str(lock),
            ],
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

    def pause(self) -> None:
        """Stop the worker's processes (SIGSTOP) while another measures: compiling and building
        on the host slowed the measured copies by up to 14% per run on an H100 machine."""
        if self._paused_at is None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGSTOP)
            self._paused_at = time.perf_counter()

    def resume(self) -> None:
        if self._paused_at is not None:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGCONT)
            self.paused_s += time.perf_counter() - self._paused_at
            self._paused_at = None

    def elapsed(self) -> float:
        """Seconds since it started, not counting pauses."""
        paused = self.paused_s
        if self._paused_at is not None:
            paused += time.perf_counter() - self._paused_at
        return time.perf_counter() - self.began - paused


def run_grid(
    cells: list[dict], out: Path, jobs: int, timeout: float, deadline: float, quiet: bool = False
) -> list[dict]:
    """Run every cell in its own worker, ``jobs`` at a time, one measuring at a time; write
    ``results.json`` after each cell, so a run cut short keeps what it measured. No worker
    starts ``deadline`` seconds after the first (the rest are listed as not run). With
    ``quiet`` the other workers are stopped while one measures."""
    began = time.perf_counter()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    lock = out / ".gpu.lock"
    events: queue.Queue = queue.Queue()
    todo = deque(enumerate(cells))
    running: dict[_Worker, int] = {}
    ready: deque[_Worker] = deque()
    measuring: _Worker | None = None
    locked = False  # the measuring worker holds the GPU lock (others may be stopped)
    done: dict[int, list[dict]] = {}
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
            if quiet and locked:
                worker.pause()
        try:
            worker, line = events.get(timeout=5)
        except queue.Empty:
            worker, line = None, None
        if worker is not None and line == "READY":
            ready.append(worker)
        elif worker is not None and line == "MEASURING":  # it holds the GPU lock: no other can
            locked = True
            if quiet:
                for other in running:
                    if other is not worker:
                        other.pause()
        elif worker is not None and line is not None and line.startswith("CELL "):
            worker.results.append(json.loads(line[5:]))
        elif worker is not None and line is None:  # the worker exited
            cells = worker.results or [{**worker.spec, "error": _tail(worker.log.name)}]
            done[running.pop(worker)] = cells
            if measuring is worker:
                measuring, locked = None, False
                for other in running:
                    other.resume()
            if worker in ready:
                ready.remove(worker)
            for cell in cells:
                status = cell.get("error") or " ".join(
                    f"{r['tokens']}:{r['ms']:.2f}" for r in cell.get("results", [])
                )
                print(
                    f"[{time.perf_counter() - worker.began:5.0f} s] {label(cell)} "
                    f"{cell.get('mode', '')}: {status}",
                    flush=True,
                )
            (out / "results.json").write_text(json.dumps(analyse(_ordered(done)), indent=1))
        for worker in list(running):
            if worker.elapsed() > timeout and worker.proc.poll() is None:
                worker.resume()
                worker.results = [{**worker.spec, "error": f"timed out after {timeout:.0f} s"}]
                worker.proc.send_signal(signal.SIGUSR1)  # its stacks into its log (faulthandler)
                time.sleep(1)
                os.killpg(worker.proc.pid, signal.SIGKILL)
        if measuring is None and ready:
            measuring = ready.popleft()
            measuring.go()
    return analyse(_ordered(done))


def _ordered(done: dict[int, list[dict]]) -> list[dict]:
    return [cell for i in sorted(done) for cell in done[i]]


def _tail(path: str) -> str:
    return Path(path).read_text()[-500:]


def worker_main(spec: dict, lock_path: Path) -> int:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent's timeout asks

    def go() -> None:
        print("READY", flush=True)
        if sys.stdin.readline().strip() != "GO":
            raise SystemExit("the parent went away")

    def measuring() -> None:
        print("MEASURING", flush=True)

    try:
        results = run_cell(spec, GpuLock(lock_path), go, measuring)
    except Exception as err:  # a failed cell is reported, not fatal to the grid
        results = [{**spec, "error": f"{type(err).__name__}: {err}"[:500]}]
    for result in results:
        print("CELL " + json.dumps(result), flush=True)
    return 0


def write_outputs(cells: list[dict], out: Path, command: str) -> None:
    (out / "results.json").write_text(json.dumps(cells, indent=1))
    (out / "results.md").write_text(markdown(cells, command))
    plot(cells, out / "results.png")


def merge(dirs: list[Path]) -> list[dict]:
    """The cells of several runs (possibly on different machines of one kind) as one grid;
    each cell's bound uses the bandwidth measured in its own run."""
    cells = []
    for directory in dirs:
        run = json.loads((directory / "results.json").read_text())
        gbps = next((c["h2d_GBps"] for c in run if c["method"] == "bandwidth"), None)
        for cell in run:
            if cell["method"] == "bandwidth":
                continue
            cells.append({**cell, "run": directory.name, "run_h2d_GBps": gbps})
    return analyse(cells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run (CI)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--lock", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--merge", type=Path, nargs="+", help="join the runs in these directories")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--tokens", type=_ints)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per token count")
    parser.add_argument("--min-run-s", type=float, default=0.5, help="shortest timed run")
    parser.add_argument("--jobs", type=int, default=3, help="cells prepared at once")
    parser.add_argument("--modes", type=_modes, help="MODE[+FLAG...][.N],... (MODE_FLAGS)")
    parser.add_argument(
        "--configs", type=_configs, help="group/num/step[:pp|:layer],... e.g. 2/1/1:pp,1/1/2"
    )
    parser.add_argument("--hook-configs", type=_configs)
    parser.add_argument("--uva", type=lambda s: [u for u in s.split(",") if u])
    parser.add_argument("--uva-gb", type=float, default=1.0)
    parser.add_argument("--peers", type=lambda s: [p for p in s.split(",") if p], default=[])
    parser.add_argument("--cap", type=float, help="memory fraction for a capped run")
    parser.add_argument(
        "--paired", action="store_true", help="time the modes of each config in turns"
    )
    parser.add_argument(
        "--both-orders",
        action="store_true",
        help="with --paired, run each config twice, its models built in the --modes order and "
        "in the reverse order",
    )
    parser.add_argument(
        "--reverse-turns",
        action="store_true",
        help="with --paired, time the models in turns in the reverse of their build order",
    )
    parser.add_argument(
        "--fresh-memory",
        action="store_true",
        help="empty the CUDA caching allocator's cache before each model is placed, so that its "
        "weights take new segments, not those an earlier model's warm-up freed",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="stop the other workers while one measures"
    )
    parser.add_argument("--no-resident", action="store_true", help="T_compute from --merge")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    parser.add_argument("--deadline", type=float, default=1e9, help="no cell starts after it")
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(json.loads(args.worker), args.lock)
    if args.out is None:
        parser.error("--out is required")
    if args.reverse_turns and not args.paired:
        parser.error("--reverse-turns needs --paired (it reverses the turns of a paired cell)")
    if args.both_orders and not args.paired:
        parser.error("--both-orders needs --paired (it reverses the build order of a paired cell)")
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.offload_bench " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    if args.merge:
        cells = merge(args.merge)
    else:
        _defaults(args)
        cells = run_grid(grid(args), args.out, args.jobs, args.timeout, args.deadline, args.quiet)
    write_outputs(cells, args.out, command)
    print((args.out / "results.md").read_text())
    return 0


def _defaults(args: argparse.Namespace) -> None:
    if args.smoke:
        args.layers = args.layers or 4
        args.tokens = args.tokens or [4, 16]
        args.modes = args.modes or ["default"]
        args.configs = args.configs or _configs("1/1/1,2/1/2,2/1/1:pp")
        args.hook_configs = _configs("2/1/2") if args.hook_configs is None else args.hook_configs
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
            args.configs = _configs(",".join(f"{g}/1/{s}" for g in (1, 2, 4, 8) for s in (1, 2, 4)))


def _modes(text: str) -> list[str]:
    """Comma-separated benchmark modes (``default,reduce-overhead+static``), flags checked."""
    modes = text.split(",")
    for mode in modes:
        try:
            mode_flags(mode)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return modes


def _ints(text: str) -> list[int]:
    """Comma-separated integers (``--tokens 1,16,2048``)."""
    return [int(t) for t in text.split(",")]


def _configs(text: str) -> list[dict]:
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
