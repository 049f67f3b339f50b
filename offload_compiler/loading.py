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
import json
import logging
import os
import struct
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import OffloadConfig
from .discovery import layer_list_of
from .host_memory import _HOST_COPIES, PinnedArena, cuda_view_of_pinned, mark_offloaded
from .planning import plan_prefetch, plan_uva, shared_parameters

log = logging.getLogger(__name__)

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
_STAGING_BYTES = 64 * 2**20  # what one read into the staging buffer moves at most


class CheckpointError(ValueError):
    """The checkpoint does not match the model, or a file is damaged."""


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in a safetensors file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of its first byte in the file
    nbytes: int


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


def checkpoint_files(path: str | os.PathLike[str]) -> list[Path]:
    """The safetensors files of a checkpoint: ``path`` itself, or in the directory ``path`` the
    shards its ``model.safetensors.index.json`` names, or its ``model.safetensors``."""
    path = Path(path)
    if path.is_file():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a safetensors index ({err})") from None
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that do not exist: {missing}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(
        f"{path}: no safetensors checkpoint (a .safetensors file, or a directory with "
        "model.safetensors or model.safetensors.index.json)"
    )


def read_index(files: list[Path]) -> dict[str, StoredTensor]:
    """Every tensor of ``files`` by name, from their headers, each checked against its file's
    size (a truncated or corrupt file is named)."""
    stored: dict[str, StoredTensor] = {}
    for file in files:
        size = file.stat().st_size
        with file.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{file}: truncated (no safetensors header)")
            (length,) = struct.unpack("<Q", raw)
            if length > size - 8:
                raise CheckpointError(f"{file}: truncated or corrupt (header of {length} bytes)")
            try:
                header = json.loads(f.read(length))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise CheckpointError(f"{file}: corrupt safetensors header ({err})") from None
        data = 8 + length
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype = _DTYPES.get(entry.get("dtype"))
            if dtype is None:
                raise CheckpointError(f"{file}: {name} has unsupported dtype {entry.get('dtype')}")
            begin, end = entry["data_offsets"]
            shape = tuple(entry["shape"])
            nbytes = dtype.itemsize * _numel(shape)
            if end - begin != nbytes or data + end > size:
                raise CheckpointError(
                    f"{file}: {name} lies outside the file or has the wrong length "
                    f"(bytes {begin}-{end} for {nbytes}; the file holds {size - data}): "
                    "truncated or corrupt"
                )
            if name in stored:
                raise CheckpointError(f"{name} is stored twice ({stored[name].file}, {file})")
            stored[name] = StoredTensor(file, dtype, shape, data + begin, nbytes)
    return stored


@torch.no_grad()
def load_checkpoint(
    model: nn.Module,
    checkpoint: str | os.PathLike[str],
    options: OffloadConfig | Mapping[str, Any] | None = None,
    device: torch.device | str = "cuda",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Fill ``model`` (parameters on the meta device) from ``checkpoint``, placed as
    `place_model` places it for ``options``: offloaded parameters in pinned host memory, the
    rest on ``device``. ``dtype`` converts floating-point tensors (default: as stored).
    Returns ``model``."""
    config = OffloadConfig.from_options(options)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    files = checkpoint_files(checkpoint)
    stored = read_index(files)
    params = _unique_parameters(model)
    sources = _match(params, stored, dtype)
    offloaded = {id(p) for p in _offloaded(model, config)}
    start = time.perf_counter()
    total = sum(stored[sources[id(p)]].nbytes for _, p in params)
    arena_params = [p for _, p in params if id(p) in offloaded]
    targets = [_target_dtype(stored[sources[id(p)]].dtype, dtype) for p in arena_params]
    shapes = [
        torch.empty(p.shape, dtype=d, device="meta")
        for p, d in zip(arena_params, targets, strict=True)
    ]
    pinned = device.type == "cuda"
    arena = PinnedArena(shapes) if pinned else None
    staging = _Staging(pinned)
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
            new = _bind(holders[id(param)], param, view)
            _HOST_COPIES[new] = host
            mark_offloaded(new)
            bar.update(entry.nbytes)
        for _, param in params:
            if id(param) in offloaded:
                continue
            entry = stored[sources[id(param)]]
            value = torch.empty(param.shape, dtype=_target_dtype(entry.dtype, dtype), device=device)
            staging.read_into(entry, value)
            _bind(holders[id(param)], param, value)
            bar.update(entry.nbytes)
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            module._buffers[name] = buffer.to(device)
    if config.selected_backend == "prefetch":
        layer_list_of(model, config.layers_path)  # remembered for the new Parameters
    seconds = time.perf_counter() - start
    host_bytes = sum(a.nbytes for a in arena.blocks) if arena is not None else 0
    log.info(
        "offload: loaded %.1f MiB from %d file(s) in %.2f s (%.2f GB/s): %d tensors, %.1f MiB "
        "offloaded to %s host memory, the rest on %s",
        total / 2**20, len(files), seconds, total / seconds / 1e9, len(params),
        host_bytes / 2**20 if pinned else sum(p.nbytes for p in arena_params) / 2**20,
        "pinned" if pinned else "CPU", device,
    )  # fmt: skip
    return model


class _Staging:
    """Reads file bytes into a tensor: straight into its memory where it is host memory of the
    stored dtype, else through one reused (pinned, on CUDA) buffer, chunk by chunk."""

    def __init__(self, pinned: bool) -> None:
        self._buffer = torch.empty(_STAGING_BYTES, dtype=torch.uint8, pin_memory=pinned)

    def read_into(self, entry: StoredTensor, dst: torch.Tensor) -> None:
        with entry.file.open("rb", buffering=0) as f:
            f.seek(entry.offset)
            if dst.device.type == "cpu" and dst.dtype == entry.dtype and dst.is_contiguous():
                _read_exactly(f, dst.view(-1).view(torch.uint8).numpy(), entry)
                return
            flat = dst.view(-1)
            itemsize = entry.dtype.itemsize
            per_chunk = _STAGING_BYTES // itemsize
            for begin in range(0, flat.numel(), per_chunk):
                count = min(per_chunk, flat.numel() - begin)
                chunk = self._buffer[: count * itemsize]
                _read_exactly(f, chunk.numpy(), entry)
                flat[begin : begin + count].copy_(chunk.view(entry.dtype))
            if dst.device.type == "cuda":
                torch.cuda.current_stream(dst.device).synchronize()  # the buffer is reused


def _read_exactly(f: Any, into: Any, entry: StoredTensor) -> None:
    view = memoryview(into).cast("B")
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise CheckpointError(f"{entry.file}: ended early while reading (truncated)")
        done += n


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


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
    params: list[tuple[list[str], nn.Parameter]],
    stored: Mapping[str, StoredTensor],
    dtype: torch.dtype | None,
) -> dict[int, str]:
    """The stored name of each parameter, after checking that every parameter is stored once,
    nothing else is, and shapes agree (each problem names its tensors)."""
    sources: dict[int, str] = {}
    missing, mismatched = [], []
    for names, param in params:
        found = [name for name in names if name in stored]
        if not found:
            missing.append(names[0])
            continue
        sources[id(param)] = found[0]
        if stored[found[0]].shape != tuple(param.shape):
            mismatched.append(
                f"{found[0]}: stored {list(stored[found[0]].shape)}, model {list(param.shape)}"
            )
    known = {name for names, _ in params for name in names}
    unexpected = sorted(set(stored) - known)
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {', '.join(missing)}")
    if unexpected:
        problems.append(f"in the checkpoint but not in the model: {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"shapes differ: {'; '.join(mismatched)}")
    if problems:
        raise CheckpointError("the checkpoint does not match the model: " + ". ".join(problems))
    return sources


def _offloaded(model: nn.Module, config: OffloadConfig) -> list[nn.Parameter]:
    """The parameters ``config`` offloads, as `place_model` chooses them."""
    if config.selected_backend == "prefetch":
        found = layer_list_of(model, config.layers_path)
        shared = shared_parameters(found.layers, model)
        return plan_prefetch(found.layers, found.path, config.prefetch, shared).parameters(
            found.layers
        )
    if config.selected_backend == "uva":
        named = dict(model.named_parameters())
        return [named[name] for name in plan_uva(model, config.uva).params]
    return []


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
