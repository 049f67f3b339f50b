"""Loading a safetensors checkpoint straight into its offloaded placement.

A model too big for the GPU is built with its parameters on the meta device
(`init_empty_weights`), then `load_checkpoint` reads each tensor from the files into its final
place: an offloaded parameter's bytes go from the file into its slice of the pinned blocks
(`host_memory.PinnedArena`), every other tensor to the device through one reused staging
buffer. Nothing else holds a copy of the model on the way.

The safetensors format is an 8-byte little-endian header length, a JSON header mapping each
tensor's name to its dtype, shape and byte range in the data that follows, and the data. The
header is read and checked for every file before any memory is allocated, so a missing,
unexpected or mismatched tensor, or a truncated file, fails before the model is touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import OffloadConfig
from .discovery import stack_of
from .host_memory import (
    PinnedArena,
    cuda_view_of_pinned,
    plan_pinned_blocks,
    remember_host_copy,
)
from .placement import offloaded_parameters
from .planner import resolve_budget
from .safetensors_files import (
    STAGING_BYTES,
    CheckpointError,
    Staging,
    StoredTensor,
    checkpoint_files,
    read_index,
)

log = logging.getLogger(__name__)


@contextlib.contextmanager
def init_empty_weights() -> Iterator[None]:
    """Build modules with their parameters on the meta device (no memory, initialisers do
    nothing); buffers, such as rotary frequencies computed in ``__init__``, stay real."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


@torch.no_grad()
def load_checkpoint(
    model: nn.Module,
    checkpoint: str | os.PathLike[str],
    options: OffloadConfig | Mapping[str, Any] | None = None,
    device: torch.device | str = "cuda",
    dtype: torch.dtype | None = None,
    report: dict[str, float] | None = None,
) -> nn.Module:
    """Fill ``model`` (parameters on the meta device) from ``checkpoint``, placed as
    `place_model` places it for ``options``: offloaded parameters in pinned host memory, the
    rest on ``device``. ``dtype`` converts floating-point tensors (default: as stored).
    Returns ``model``; ``report``, if given, receives the figures of the INFO summary (bytes,
    seconds, GB/s, host and GPU peaks during the load)."""
    config = OffloadConfig.from_options(options)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    files = checkpoint_files(checkpoint)
    stored = read_index(files)
    params = _unique_parameters(model)
    sources = _match(params, stored)
    if config.gpu_memory_budget is not None:  # planned on the sizes the load will place
        for _, param in params:
            target = _target_dtype(stored[sources[id(param)]].dtype, dtype)
            if param.dtype != target:
                param.data = param.data.to(target)
    config = resolve_budget(config, model, device)
    offloaded = {id(p) for p in offloaded_parameters(model, config, device)}
    start = time.perf_counter()
    total = sum(stored[sources[id(p)]].nbytes for _, p in params)
    arena_params = [p for _, p in params if id(p) in offloaded]
    targets = [_target_dtype(stored[sources[id(p)]].dtype, dtype) for p in arena_params]
    layouts = [
        torch.empty(p.shape, dtype=d, device="meta")
        for p, d in zip(arena_params, targets, strict=True)
    ]
    offloaded_bytes = sum(_nbytes(t) for t in layouts)
    pinned = device.type == "cuda"
    resident = [p for _, p in params if id(p) not in offloaded]
    resident_bytes = sum(
        p.numel() * _target_dtype(stored[sources[id(p)]].dtype, dtype).itemsize for p in resident
    )
    if pinned:  # the pinned blocks, rounded as they will be
        host_needed = sum(plan_pinned_blocks([_nbytes(t) for t in layouts]).block_bytes)
    else:
        host_needed = offloaded_bytes + resident_bytes
    _check_memory(host_needed + STAGING_BYTES, resident_bytes if pinned else 0, device)
    peaks = _Peaks(device)
    arena = PinnedArena(layouts) if pinned else None
    staging = Staging(pinned)
    holders = _holders(model)
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading", leave=False) as bar:
        for position, param in enumerate(arena_params):
            entry = stored[sources[id(param)]]
            if arena is not None:
                host = arena.empty(position)
            else:
                host = torch.empty(param.shape, dtype=targets[position])
            staging.read_into(entry, host)
            view = cuda_view_of_pinned(host, device) if pinned else host
            remember_host_copy(_bind(holders[id(param)], param, view), host)
            bar.update(entry.nbytes)
        for param in resident:
            entry = stored[sources[id(param)]]
            value = torch.empty(param.shape, dtype=_target_dtype(entry.dtype, dtype), device=device)
            staging.read_into(entry, value)
            _bind(holders[id(param)], param, value)
            bar.update(entry.nbytes)
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            module._buffers[name] = buffer.to(device)
    if config.selected_backend == "prefetch":
        stack_of(model, config.layers_path)  # remembered for the new Parameters
    seconds = time.perf_counter() - start
    host_peak, gpu_peak = peaks.read()
    figures = {
        "bytes": total,
        "seconds": seconds,
        "GBps": total / seconds / 1e9,
        "host_peak_bytes": host_peak,
        "gpu_peak_bytes": gpu_peak,
    }
    if report is not None:
        report.update(figures)
    log.info(
        "offload: loaded %.1f MiB from %d file(s) in %.2f s (%.2f GB/s); %d tensors, %.1f MiB "
        "offloaded to %s host memory, the rest on %s; peaks during the load: host +%.1f MiB, "
        "GPU %.1f MiB",
        total / 2**20, len(files), seconds, figures["GBps"], len(params),
        offloaded_bytes / 2**20,
        "pinned" if pinned else "CPU", device, host_peak / 2**20, gpu_peak / 2**20,
    )  # fmt: skip
    return model


def _available_host_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_memory(host_needed: int, gpu_needed: int, device: torch.device) -> None:
    """Refuse a load that cannot fit, before anything is allocated."""
    available = _available_host_bytes()
    if available is not None and host_needed > available:
        raise MemoryError(
            f"not enough host memory to load this checkpoint: it needs {host_needed / 2**30:.2f} "
            f"GiB (the offloaded part, and a staging buffer), {available / 2**30:.2f} GiB are "
            "available"
        )
    if device.type == "cuda" and gpu_needed:
        free, total = torch.cuda.mem_get_info(device)
        capped = ""
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _: 1.0)(device)
        if fraction < 1.0:  # torch.cuda.set_per_process_memory_fraction caps this process
            allowed = int(fraction * total) - torch.cuda.memory_allocated(device)
            if allowed < free:
                free, capped = allowed, f" under this process's memory fraction {fraction:.3f}"
        if gpu_needed > free:
            raise MemoryError(
                f"not enough GPU memory on {device} for the resident part: it needs "
                f"{gpu_needed / 2**30:.2f} GiB, {free / 2**30:.2f} GiB are free{capped}; "
                "offload more layers"
            )


class _Peaks:
    """Peak host memory (resident set above its level at the start) and peak GPU memory
    allocated, from now until `read`."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts here
        self._rss = _status_bytes("VmRSS")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def read(self) -> tuple[int, int]:
        host = max(0, _status_bytes("VmHWM") - self._rss)
        gpu = torch.cuda.max_memory_allocated(self._device) if self._device.type == "cuda" else 0
        return host, gpu


def _status_bytes(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _target_dtype(stored: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    return requested if requested is not None and stored.is_floating_point else stored


def _unique_parameters(model: nn.Module) -> list[tuple[list[str], nn.Parameter]]:
    """Each parameter once, with every name it has (tied weights have several)."""
    names: dict[int, list[str]] = {}
    objects: dict[int, nn.Parameter] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
        objects[id(param)] = param
    return [(names[key], objects[key]) for key in names]


def _match(
    params: list[tuple[list[str], nn.Parameter]], stored: Mapping[str, StoredTensor]
) -> dict[int, str]:
    """The stored name of each parameter, after checking that every parameter is stored once,
    nothing else is, and shapes and kinds of dtype (floating point or not) agree (each problem
    names its tensors)."""
    sources: dict[int, str] = {}
    missing, mismatched = [], []
    for names, param in params:
        found = [name for name in names if name in stored]
        if not found:
            missing.append(names[0])
            continue
        sources[id(param)] = found[0]
        entry = stored[found[0]]
        if entry.shape != tuple(param.shape):
            mismatched.append(f"{found[0]}: stored {list(entry.shape)}, model {list(param.shape)}")
        elif entry.dtype.is_floating_point != param.dtype.is_floating_point:
            mismatched.append(f"{found[0]}: stored {entry.dtype}, model {param.dtype}")
    known = {name for names, _ in params for name in names}
    unexpected = sorted(set(stored) - known)
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {', '.join(missing)}")
    if unexpected:
        problems.append(f"in the checkpoint but not in the model: {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"shapes or dtypes differ: {'; '.join(mismatched)}")
    if problems:
        raise CheckpointError("the checkpoint does not match the model: " + ". ".join(problems))
    return sources


def _holders(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Every (module, attribute) that holds each parameter."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), []).append((module, name))
    return holders


def _bind(
    holders: list[tuple[nn.Module, str]], old: nn.Parameter, value: torch.Tensor
) -> nn.Parameter:
    """One new Parameter of ``value`` in every place that held ``old`` (tied weights stay
    tied); a meta tensor cannot take real data in place."""
    new = nn.Parameter(value, requires_grad=old.requires_grad)
    for module, name in holders:
        module._parameters[name] = new
    return new


def from_pretrained(
    path: str | os.PathLike[str],
    options: OffloadConfig | Mapping[str, Any] | None = None,
    device: torch.device | str = "cuda",
    dtype: torch.dtype | None = None,
    report: dict[str, float] | None = None,
) -> nn.Module:
    """A transformers causal language model from a checkpoint directory (``config.json`` and
    safetensors files), built with its parameters on the meta device and loaded straight into
    the placement ``options`` asks for (`load_checkpoint`, which fills ``report``). Needs
    transformers.

    Its ``generation_config.compile_config`` names the offload backend with ``options``: where
    ``generate`` compiles the decode step itself (a static cache on a GPU), plain Inductor would
    otherwise compile a graph that reads every offloaded weight across the bus."""
    from transformers import AutoConfig, AutoModelForCausalLM, CompileConfig, GenerationConfig

    config = AutoConfig.from_pretrained(path)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    load_checkpoint(model, path, options, device, dtype, report)
    with contextlib.suppress(OSError):
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.generation_config.compile_config = CompileConfig(
        backend="offload", mode=None, options=OffloadConfig.from_options(options).model_dump()
    )
    return model.eval()
