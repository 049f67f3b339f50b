"""Safetensors checkpoints on disk: which files, what their headers say, and reading a tensor's
bytes into memory that is already where it belongs.

The format is an 8-byte little-endian header length, a JSON header mapping each tensor's name
to its dtype, shape and byte range in the data that follows, and the data. Reading the headers
alone tells everything a load must check before it allocates anything; reading the bytes
ourselves (rather than through ``safetensors.safe_open``, which makes a tensor of each) lets
them land straight in pinned memory.
"""

from __future__ import annotations

import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
STAGING_BYTES = 64 * 2**20  # what one read into the staging buffer moves at most


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


def read_gbps(files: list[Path]) -> float:
    """How fast this machine reads ``files`` (GB/s, through one reused buffer): the figure to
    set beside a load's speed. Files read just before come from the page cache."""
    buffer = memoryview(bytearray(STAGING_BYTES))
    total, start = 0, time.perf_counter()
    for file in files:
        with file.open("rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    return total / (time.perf_counter() - start) / 1e9


class Staging:
    """Reads file bytes into a tensor: straight into its memory where it is host memory of the
    stored dtype, else through one reused (pinned, on CUDA) buffer, chunk by chunk."""

    def __init__(self, pinned: bool) -> None:
        self._buffer = torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=pinned)

    def read_into(self, entry: StoredTensor, dst: torch.Tensor) -> None:
        with entry.file.open("rb", buffering=0) as f:
            f.seek(entry.offset)
            if dst.device.type == "cpu" and dst.dtype == entry.dtype and dst.is_contiguous():
                _read_exactly(f, dst.view(-1).view(torch.uint8).numpy(), entry)
                return
            flat = dst.view(-1)
            itemsize = entry.dtype.itemsize
            per_chunk = STAGING_BYTES // itemsize
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
