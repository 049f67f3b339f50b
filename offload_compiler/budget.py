"""Memory amounts as users give them: bytes, a string with a unit, or a fraction of a device."""

from __future__ import annotations

import os
import re

import torch

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_AMOUNT = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")

MemoryAmount = int | float | str
"""Bytes (an int), a fraction of the device's memory (a float in (0, 1]), or a string with a
unit: ``"10GiB"``, ``"512 MiB"``, ``"12GB"``."""


def check_amount(value: MemoryAmount) -> MemoryAmount:
    """``value`` if it is a well-formed amount, else a ValueError naming it (no device needed)."""
    to_bytes(value, device_total=1 << 40)
    return value


def to_bytes(value: MemoryAmount, device_total: int) -> int:
    """``value`` in bytes; a fraction is of ``device_total``."""
    if isinstance(value, bool):
        raise ValueError(f"memory amount {value!r} is not a number of bytes")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"memory amount {value} must not be negative")
        return value
    if isinstance(value, float):
        if not 0 < value <= 1:
            raise ValueError(
                f"memory amount {value} as a float is a fraction of the device's memory and must "
                "be in (0, 1]; give bytes as an int or a string with a unit, e.g. '10GiB'"
            )
        return int(value * device_total)
    match = _AMOUNT.match(str(value))
    unit = match and _UNITS.get(match.group(2).upper())
    if not unit:
        raise ValueError(
            f"memory amount {value!r} is not bytes, a fraction in (0, 1] or a number with a unit "
            f"({', '.join(u for u in _UNITS if u)}), e.g. '10GiB'"
        )
    return int(float(match.group(1)) * unit)


def device_total_bytes(device: torch.device) -> int:
    """The memory of ``device`` (CUDA), or of this machine (CPU, where budgets are notional)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def human(nbytes: float) -> str:
    """``nbytes`` in the largest binary unit that keeps it at 1 or more: ``"9.31 GiB"``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{int(nbytes)} B"
