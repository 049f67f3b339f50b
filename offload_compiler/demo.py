"""End-to-end demo of the ``offload`` backend on a Llama-shaped decoder.

Run ``python -m offload_compiler.demo`` (``--help`` lists the knobs). It builds one model on the
CPU and a deep copy of it as the reference, then:

  1. places the model with `offload_compiler.place_model` (the offloaded layers' weights go to
     pinned host memory, the rest to the device), compiles it with ``backend="offload"`` and
     runs it;
  2. moves the reference to the device whole and compiles it with plain ``torch.compile`` in
     the same Inductor mode;
  3. checks that both give the same logits on the same random token ids, times both, and prints
     how many bytes were offloaded, how big the slot pool is and what stays on the GPU.

On a CUDA machine the defaults are a ~1.8 GB bf16 model compiled with ``reduce-overhead`` (CUDA
graph trees); GPU memory is measured with ``torch.cuda.memory_allocated``, for the offloaded
model before the reference is built. On a CPU-only machine the defaults are a small fp32 model:
the same rewritten graph runs with synchronous copies into the slots, so the demo checks
correctness there, and memory figures are what would stay off a GPU.

Exits with status 1 if the outputs differ.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from .config import OffloadConfig
from .llama import LlamaShaped
from .placement import place_model

log = logging.getLogger("offload_compiler.demo")

_WARMUPS = 3
_CHECKS = 3  # calls, each on fresh ids, whose outputs are compared

# Defaults per device. CUDA: 16 x 90 MiB layers + 2 x 125 MiB embedding/head = 1.77 GB bf16.
_PRESETS: dict[str, dict[str, Any]] = {
    "cuda": {
        "layers": 16,
        "dim": 2048,
        "heads": 16,
        "kv_heads": 8,
        "hidden": 5632,
        "vocab": 32000,
        "tokens": 1024,
        "iters": 20,
        "mode": "reduce-overhead",
    },
    "cpu": {
        "layers": 8,
        "dim": 256,
        "heads": 8,
        "kv_heads": 4,
        "hidden": 512,
        "vocab": 1024,
        "tokens": 64,
        "iters": 10,
        "mode": "default",
    },
}


@dataclass
class RunResult:
    """What one model produced: outputs of the checked calls (on the CPU) and timings."""

    outputs: list[torch.Tensor]
    ms_per_forward: float
    placed_bytes: int | None = None  # GPU memory taken by putting the model on the device
    first_call_bytes: int | None = None  # ... and by compiling it and running it once


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m offload_compiler.demo",
        description="Compare a model compiled with the offload backend against plain "
        "torch.compile: outputs, speed and GPU memory.",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    size = parser.add_argument_group("model (defaults depend on the device)")
    size.add_argument("--layers", type=int, help="decoder layers (cuda 16, cpu 8)")
    size.add_argument("--dim", type=int, help="hidden size (cuda 2048, cpu 256)")
    size.add_argument("--heads", type=int, help="attention heads (cuda 16, cpu 8)")
    size.add_argument("--kv-heads", type=int, help="KV heads (cuda 8, cpu 4)")
    size.add_argument("--hidden", type=int, help="MLP hidden size (cuda 5632, cpu 512)")
    size.add_argument("--vocab", type=int, help="vocabulary size (cuda 32000, cpu 1024)")
    size.add_argument("--tokens", type=int, help="tokens per forward, batch 1 (cuda 1024, cpu 64)")
    offload = parser.add_argument_group("offloading")
    offload.add_argument("--group", type=int, default=2, help="offload_group_size (2)")
    offload.add_argument("--num-in-group", type=int, default=1, help="offload_num_in_group (1)")
    offload.add_argument(
        "--prefetch-step", type=int, default=2, help="offload_prefetch_step, i.e. slots (2)"
    )
    parser.add_argument(
        "--mode",
        choices=["default", "reduce-overhead"],
        help="Inductor mode for both models (cuda: reduce-overhead, cpu: default)",
    )
    parser.add_argument("--iters", type=int, help="timed calls (cuda 20, cpu 10)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch build or machine has no CUDA GPU")
    for name, value in _PRESETS[args.device].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.device == "cpu" and args.mode == "reduce-overhead":
        parser.error("--mode reduce-overhead needs CUDA (it captures CUDA graphs)")
    for name in ("layers", "dim", "heads", "kv_heads", "hidden", "vocab", "tokens", "iters"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.dim % args.heads or args.heads % args.kv_heads:
        parser.error("--dim must be a multiple of --heads, and --heads of --kv-heads")
    try:  # fail on bad offload flags before building a big model
        OffloadConfig.from_options(offload_options(args))
    except ValidationError as err:
        parser.error("; ".join(e["msg"] for e in err.errors()))
    return args


def offload_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``torch.compile(options=...)`` of the offloaded model."""
    options: dict[str, Any] = {
        "prefetch": {
            "offload_group_size": args.group,
            "offload_num_in_group": args.num_in_group,
            "offload_prefetch_step": args.prefetch_step,
        }
    }
    if args.mode != "default":
        options["mode"] = args.mode
    return options


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(args: argparse.Namespace, dtype: torch.dtype) -> LlamaShaped:
    """The model, on the CPU, created directly in ``dtype`` (no fp32 copy of a big model)."""
    with default_dtype(dtype):
        model = LlamaShaped(
            layers=args.layers,
            dim=args.dim,
            heads=args.heads,
            kv_heads=args.kv_heads,
            hidden=args.hidden,
            vocab=args.vocab,
        )
    return model.eval()


def param_bytes(module: nn.Module) -> int:
    return sum(p.nbytes for p in module.parameters())


def offload_layout(model: LlamaShaped, options: dict[str, Any]) -> tuple[list[int], int, int]:
    """Offloaded layer indices, their bytes, and the bytes of the slot pool, from the config.

    Every parameter of an offloaded layer is offloaded (``offload_params`` is not set), and all
    layers have the same shapes, so the pool is ``slots`` x one layer.
    """
    prefetch = OffloadConfig.from_options(options).prefetch
    indices = prefetch.offloaded_layers(len(model.layers))
    offloaded = sum(param_bytes(model.layers[i]) for i in indices)
    slots = min(prefetch.offload_prefetch_step, len(indices))
    slot_bytes = slots * param_bytes(model.layers[indices[0]]) if indices else 0
    return indices, offloaded, slot_bytes


def gpu_allocated(device: torch.device) -> int:
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device)


def median_ms(fn: Callable[[], Any], device: torch.device, iters: int) -> float:
    """Milliseconds per call: the median over 3 runs of ``iters`` back-to-back calls of ``fn``
    (after ``_WARMUPS`` untimed ones), as a serving loop calls it, between device-wide syncs:
    a sync per call, or an end event on the compute stream alone, would leave the copies
    started for the next call outside the timed window.

    Outputs are dropped, not read: under reduce-overhead the next replay overwrites them.
    """
    for _ in range(_WARMUPS):
        fn()
    cuda = device.type == "cuda"
    times = []
    for _ in range(3):
        if cuda:
            torch.cuda.synchronize(device)
        begin = time.perf_counter()
        for _ in range(iters):
            fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - begin) * 1e3 / iters)
    return statistics.median(times)


def run_compiled(
    compiled: Callable[[torch.Tensor], torch.Tensor],
    ids: list[torch.Tensor],
    device: torch.device,
    iters: int,
    first_output: torch.Tensor,
) -> tuple[list[torch.Tensor], float]:
    """Outputs on ``ids`` (cloned to the CPU before the next call) and the median time."""
    outputs = [first_output]
    for batch in ids[1:]:
        outputs.append(compiled(batch).detach().to("cpu", copy=True))
    return outputs, median_ms(lambda: compiled(ids[0]), device, iters)


@torch.no_grad()
def run_offloaded(
    model: nn.Module,
    options: dict[str, Any],
    device: torch.device,
    ids: list[torch.Tensor],
    iters: int,
) -> RunResult:
    cuda = device.type == "cuda"
    base = gpu_allocated(device) if cuda else 0
    place_model(model, options, device)
    placed = gpu_allocated(device) - base if cuda else None
    compiled = torch.compile(model, backend="offload", options=options)
    first = compiled(ids[0]).detach().to("cpu", copy=True)
    first_call = gpu_allocated(device) - base if cuda else None
    outputs, ms = run_compiled(compiled, ids, device, iters, first)
    return RunResult(outputs, ms, placed, first_call)


@torch.no_grad()
def run_reference(
    model: nn.Module, mode: str, device: torch.device, ids: list[torch.Tensor], iters: int
) -> RunResult:
    cuda = device.type == "cuda"
    base = gpu_allocated(device) if cuda else 0
    model.to(device)
    placed = gpu_allocated(device) - base if cuda else None
    compiled = torch.compile(model, mode=mode) if cuda else torch.compile(model)
    first = compiled(ids[0]).detach().to("cpu", copy=True)
    first_call = gpu_allocated(device) - base if cuda else None
    outputs, ms = run_compiled(compiled, ids, device, iters, first)
    return RunResult(outputs, ms, placed, first_call)


def free_offloaded(model: nn.Module) -> None:
    """Drop the offloaded model's compiled graphs and resident weights from the GPU."""
    torch._dynamo.reset()
    model.to("meta")
    gc.collect()
    torch.cuda.empty_cache()


def mib(nbytes: int | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:,.1f} MiB"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}, {torch.get_num_threads()} threads), no GPU"


def check_outputs(
    got: list[torch.Tensor], expected: list[torch.Tensor], dtype: torch.dtype
) -> str | None:
    """None if every output matches, else the first mismatch's description.

    Compared by relative norm error, since the two graphs fuse differently and so round
    differently: bf16 lands near 1e-3, fp32 far under 1e-5; NaN never passes.
    """
    bound = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for call, (out, ref) in enumerate(zip(got, expected, strict=True)):
        error = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
        if not error <= bound:
            return f"call {call}: relative error {error:.3g} > {bound:g}"
    return None


def h2d_gbps(device: torch.device, nbytes: int = 256 * 2**20) -> float:
    """This machine's pinned host-to-device copy bandwidth, measured now."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev.copy_(host, non_blocking=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        dev.copy_(host, non_blocking=True)
    end.record()
    torch.cuda.synchronize(device)
    return 5 * nbytes / (start.elapsed_time(end) * 1e6)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    options = offload_options(args)

    torch.manual_seed(args.seed)
    log.info("building the model on the CPU (%s)", dtype)
    model = build_model(args, dtype)
    reference = copy.deepcopy(model)
    total = param_bytes(model)
    indices, offloaded_bytes, slot_bytes = offload_layout(model, options)
    ids = [torch.randint(0, args.vocab, (1, args.tokens), device=device) for _ in range(_CHECKS)]

    log.info("offloaded model: place_model, compile (backend='offload'), run")
    offloaded = run_offloaded(model, options, device, ids, args.iters)
    if cuda:
        free, _ = torch.cuda.mem_get_info(device)
        if free < 1.25 * total + 2**30:  # not room for the whole reference next to it
            free_offloaded(model)
    log.info("reference: whole model on %s, torch.compile", device)
    resident = run_reference(reference, args.mode, device, ids, args.iters)

    mismatch = check_outputs(offloaded.outputs, resident.outputs, dtype)
    layers = ",".join(map(str, indices)) or "none"
    lines = [
        "",
        "offload_compiler demo",
        f"  device:              {device_name(device)}",
        f"  torch:               {torch.__version__}",
        f"  model:               LlamaShaped(layers={args.layers}, dim={args.dim}, "
        f"heads={args.heads}, kv_heads={args.kv_heads}, hidden={args.hidden}, "
        f"vocab={args.vocab}), {dtype}, {args.tokens} tokens, mode {args.mode}",
        f"  offload config:      group {args.group}, {args.num_in_group} offloaded per group, "
        f"prefetch step {args.prefetch_step}",
        f"  model weights:       {mib(total)}",
        f"  offloaded:           {mib(offloaded_bytes)} in {len(indices)} layers ({layers})",
        f"  slot pool:           {mib(slot_bytes)}",
    ]
    if cuda:
        lines += [
            "  GPU memory (torch.cuda.memory_allocated, change from before placing the model):",
            f"    without offloading: {mib(resident.placed_bytes)} after .to(); "
            f"{mib(resident.first_call_bytes)} after compile + first call",
            f"    with offloading:    {mib(offloaded.placed_bytes)} after place_model; "
            f"{mib(offloaded.first_call_bytes)} after compile + first call (adds the slot pool)",
            f"    saved:              {mib(resident.first_call_bytes - offloaded.first_call_bytes)}"
            " after compile + first call",
        ]
    else:
        lines += [
            "  GPU memory:          no GPU here; on one, offloading would keep "
            f"{mib(offloaded_bytes - slot_bytes)} off it (offloaded - slot pool): "
            f"{mib(total)} -> {mib(total - offloaded_bytes + slot_bytes)} of weights",
        ]
    ratio = offloaded.ms_per_forward / resident.ms_per_forward
    lines += [
        f"  ms per forward:      offloaded {offloaded.ms_per_forward:.3f}, "
        f"resident {resident.ms_per_forward:.3f} "
        f"(per call, {args.iters} back to back); offloaded / resident = {ratio:.2f}x",
    ]
    if cuda:
        gbps = h2d_gbps(device)
        bound = max(resident.ms_per_forward, offloaded_bytes / (gbps * 1e6))
        lines.append(
            f"  physical bound:      max(resident, offloaded bytes / {gbps:.1f} GB/s H2D) = "
            f"{bound:.3f} ms; offloaded / bound = {offloaded.ms_per_forward / bound:.3f}"
        )
    lines += [
        f"  output matches:      {'no' if mismatch else 'yes'}",
    ]
    print("\n".join(lines), flush=True)
    if mismatch:
        print(
            f"error: the offloaded model's output differs from the reference's: {mismatch}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
