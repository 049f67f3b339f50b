"""End-to-end demo of the ``offload`` backend on a Llama-shaped decoder.

Run ``python -m offload_compiler.demo`` (``--help`` lists the knobs). It builds one model on the
CPU and a deep copy of it as the reference, places the model with `place_model` (offloaded
layers' weights to pinned host memory, the rest to the device) and compiles it with
``backend="offload"``, moves the reference to the device whole and compiles it with plain
``torch.compile`` in the same mode, then checks that both give the same logits on the same
token ids, times both, and prints what was offloaded and the GPU memory each took.

On a CUDA machine the default is a ~1.8 GB bf16 model under ``reduce-overhead``; on a CPU-only
machine a small fp32 model, where the same rewritten graph runs with synchronous copies into
the slots (a correctness check). Exits with status 1 if the outputs differ.
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from .config import OffloadConfig
from .llama import LlamaShaped
from .placement import place_model
from .runtime.registry import offloaded_stacks

log = logging.getLogger("offload_compiler.demo")

_CHECKS = 3  # calls, each on fresh ids, whose outputs are compared
# Model and run per device. CUDA: 16 x 90 MiB layers + 2 x 125 MiB embedding/head = 1.77 GB bf16.
_PRESETS: dict[str, dict[str, Any]] = {
    "cuda": {"layers": 16, "dim": 2048, "heads": 16, "kv_heads": 8, "hidden": 5632,
             "vocab": 32000, "tokens": 1024, "iters": 20, "mode": "reduce-overhead"},
    "cpu": {"layers": 8, "dim": 256, "heads": 8, "kv_heads": 4, "hidden": 512,
            "vocab": 1024, "tokens": 64, "iters": 10, "mode": "default"},
}  # fmt: skip


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m offload_compiler.demo",
        description="Compare a model compiled with the offload backend against plain "
        "torch.compile: outputs, speed and GPU memory.",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--layers", type=int, help="decoder layers (cuda 16, cpu 8)")
    parser.add_argument("--tokens", type=int, help="tokens per forward (cuda 1024, cpu 64)")
    parser.add_argument("--iters", type=int, help="timed calls per run (cuda 20, cpu 10)")
    parser.add_argument("--mode", choices=["default", "reduce-overhead"], help="Inductor mode")
    parser.add_argument("--group", type=int, default=2, help="offload_group_size (2)")
    parser.add_argument("--num-in-group", type=int, default=1, help="offload_num_in_group (1)")
    parser.add_argument("--prefetch-step", type=int, default=2, help="offload_prefetch_step (2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch build or machine has no CUDA GPU")
    for name, value in _PRESETS[args.device].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.device == "cpu" and args.mode == "reduce-overhead":
        parser.error("--mode reduce-overhead needs CUDA (it captures CUDA graphs)")
    if min(args.layers, args.tokens, args.iters) < 1:
        parser.error("--layers, --tokens and --iters must be >= 1")
    try:  # fail on bad offload flags before building a big model
        OffloadConfig.from_options(offload_options(args))
    except ValidationError as err:
        parser.error("; ".join(e["msg"] for e in err.errors()))
    return args


def offload_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``torch.compile(options=...)`` of the offloaded model."""
    prefetch = {
        "offload_group_size": args.group,
        "offload_num_in_group": args.num_in_group,
        "offload_prefetch_step": args.prefetch_step,
    }
    return {"prefetch": prefetch, **({"mode": args.mode} if args.mode != "default" else {})}


def build_model(args: argparse.Namespace, dtype: torch.dtype) -> LlamaShaped:
    """The model, on the CPU, created directly in ``dtype`` (no fp32 copy of a big model)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        sizes = {k: args.__dict__[k] for k in ("layers", "dim", "heads", "kv_heads", "hidden")}
        return LlamaShaped(**sizes, vocab=args.vocab).eval()
    finally:
        torch.set_default_dtype(previous)


def median_ms(fn: Callable[[], Any], device: torch.device, iters: int) -> float:
    """Milliseconds per call: the median over 3 runs of ``iters`` back-to-back calls, between
    device-wide syncs (a sync per call would leave the copies started for the next call out of
    the timed window). Outputs are dropped: under reduce-overhead the next replay overwrites
    them."""
    times = []
    for _ in range(4):  # the first run warms up
        _sync(device)
        begin = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(device)
        times.append((time.perf_counter() - begin) * 1e3 / iters)
    return statistics.median(times[1:])


@torch.no_grad()
def run(
    model: nn.Module, place: Callable[[], Callable], device: torch.device, ids, iters: int
) -> tuple[list[torch.Tensor], float, int | None]:
    """Place and compile ``model`` (``place()`` returns the compiled model), then its outputs on
    ``ids`` (copied to the CPU), its ms per forward, and the GPU memory it took by then."""
    base = _allocated(device)
    compiled = place()
    outputs = [compiled(x).detach().to("cpu", copy=True) for x in ids]
    used = _allocated(device) - base if device.type == "cuda" else None
    return outputs, median_ms(lambda: compiled(ids[0]), device, iters), used


def check_outputs(got: list[torch.Tensor], expected: list[torch.Tensor], dtype) -> str | None:
    """None if every output matches, else the first mismatch. Compared by relative norm error,
    since the two graphs fuse, and so round, differently; NaN never passes."""
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
    total = sum(p.nbytes for p in model.parameters())
    ids = [torch.randint(0, args.vocab, (1, args.tokens), device=device) for _ in range(_CHECKS)]

    def offloaded_model() -> Callable:
        place_model(model, options, device)
        return torch.compile(model, backend="offload", options=options)

    def resident_model() -> Callable:
        return torch.compile(reference.to(device), **({"mode": args.mode} if cuda else {}))

    log.info("offloaded model: place_model, compile (backend='offload'), run")
    got, offloaded_ms, offloaded_gpu = run(model, offloaded_model, device, ids, args.iters)
    (stack,) = offloaded_stacks(model)
    if cuda and torch.cuda.mem_get_info(device)[0] < 1.25 * total + 2**30:
        torch._dynamo.reset()  # not room for the whole reference beside it: drop the offloaded
        model.to("meta")
        gc.collect()
        torch.cuda.empty_cache()
    log.info("reference: whole model on %s, torch.compile", device)
    expected, resident_ms, resident_gpu = run(reference, resident_model, device, ids, args.iters)

    mismatch = check_outputs(got, expected, dtype)
    lines = [
        "",
        "offload_compiler demo",
        f"  device:         {torch.cuda.get_device_name(device) if cuda else 'CPU, no GPU'}",
        f"  torch:          {torch.__version__}",
        f"  model:          LlamaShaped, {args.layers} layers of dim {args.dim}, {dtype}, "
        f"{args.tokens} tokens, mode {args.mode}",
        f"  offload config: group {args.group}, {args.num_in_group} offloaded per group, "
        f"prefetch step {args.prefetch_step}",
        f"  weights:        {_mib(total)}; offloaded {_mib(stack.host_bytes)} in layers "
        f"{','.join(map(str, stack.layers))}; slot pool {_mib(stack.slot_bytes)}",
    ]
    if cuda:
        lines.append(
            f"  GPU memory:     {_mib(resident_gpu)} without offloading, {_mib(offloaded_gpu)} "
            "with (after placing, compiling and the checked calls)"
        )
    else:
        kept_off = stack.host_bytes - stack.slot_bytes
        lines.append(
            f"  GPU memory:     no GPU here; on one, offloading keeps {_mib(kept_off)} off"
        )
    lines.append(
        f"  ms per forward: offloaded {offloaded_ms:.3f}, resident {resident_ms:.3f} "
        f"({args.iters} calls back to back); offloaded / resident = "
        f"{offloaded_ms / resident_ms:.2f}x"
    )
    if cuda:
        gbps = h2d_gbps(device)
        bound = max(resident_ms, stack.host_bytes / (gbps * 1e6))
        lines.append(
            f"  physical bound: max(resident, offloaded bytes / {gbps:.1f} GB/s) = {bound:.3f} "
            f"ms; offloaded / bound = {offloaded_ms / bound:.3f}"
        )
    lines.append(f"  output matches: {'no' if mismatch else 'yes'}")
    print("\n".join(lines), flush=True)
    if mismatch:
        print(f"error: the offloaded model's output differs: {mismatch}", file=sys.stderr)
        return 1
    return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated(device: torch.device) -> int:
    _sync(device)
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _mib(nbytes: int | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:,.1f} MiB"


if __name__ == "__main__":
    raise SystemExit(main())
