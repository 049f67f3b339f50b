"""The static GPU slot buffers that offloaded layers share."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SlotKey:
    """What makes two layers' parameters interchangeable in one slot buffer."""

    name: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    @staticmethod
    def of(name: str, tensor: torch.Tensor) -> SlotKey:
        return SlotKey(name, tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)


class SlotPool:
    """``num_slots`` sets of static buffers on the compute device, one buffer per `SlotKey`,
    never reallocated: compiled graphs take them as static inputs, CUDA graphs bake them in."""

    def __init__(self, num_slots: int, device: torch.device) -> None:
        self.device = device
        self._buffers: list[dict[SlotKey, torch.Tensor]] = [{} for _ in range(num_slots)]

    def buffer(self, slot: int, key: SlotKey) -> torch.Tensor:
        """The buffer of ``slot`` for ``key``, allocated on first request."""
        buffers = self._buffers[slot]
        if key not in buffers:
            buffers[key] = torch.empty_strided(
                key.shape, key.stride, dtype=key.dtype, device=self.device
            )
        return buffers[key]

    def buffers(self) -> list[torch.Tensor]:
        """Every buffer allocated so far, slot by slot (each once, however many layers use it)."""
        return [buf for slot in self._buffers for buf in slot.values()]

    @property
    def nbytes(self) -> int:
        return sum(buf.untyped_storage().nbytes() for buf in self.buffers())
