"""Memory for offloaded weights: pinned host copies and the static GPU slot buffers.

An offloaded parameter keeps exactly one copy of its values, in pinned host memory (pageable
memory would make every ``non_blocking`` copy synchronous). On a CUDA machine the ``Parameter``
itself is re-pointed at a CUDA view of that pinned memory (unified addressing), so
``state_dict()``, eager calls and Dynamo's tracing read the true weights while no GPU memory is
spent on them; the compiled graph reads the slot buffers instead.

On a CPU-only machine there is nothing to pin: the parameter's own tensor is the host copy and
the "prefetch" is a synchronous copy into a slot, which exercises the same graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

# Parameter -> its host copy. Weak, so a model that is dropped frees its pinned memory; shared by
# `place_model` and the backend so that a model placed ahead of compile is not copied twice.
# Keyed by identity: a WeakKeyDictionary would compare tensors with ==, elementwise.
_HOST_COPIES = WeakIdKeyDictionary()


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


class _CudaArrayInterface:
    """Describes pinned host memory as CUDA memory, so ``torch.as_tensor`` wraps it in place."""

    def __init__(self, host: torch.Tensor) -> None:
        itemsize = host.element_size()
        if itemsize not in (1, 2, 4, 8):
            raise TypeError(f"cannot map a {host.dtype} tensor into device memory")
        self._host = host  # keeps the pinned storage alive as long as the view exists
        self.__cuda_array_interface__ = {
            "shape": tuple(host.shape),
            "strides": tuple(s * itemsize for s in host.stride()),
            # bf16 and fp8 have no type string: map the bytes, reinterpret with .view(dtype)
            "typestr": f"<u{itemsize}" if itemsize > 1 else "|u1",
            "data": (host.data_ptr(), False),
            "version": 3,
        }


def cuda_view_of_pinned(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CUDA tensor that reads and writes ``host`` (pinned) in place, using no GPU memory.

    For memory pinned by PyTorch the device address equals the host address (unified
    addressing), so the view is built from the host pointer.
    """
    if not host.is_pinned():
        raise ValueError("a device view needs pinned host memory")
    with torch.cuda.device(device):
        raw = torch.as_tensor(_CudaArrayInterface(host), device=device)
    return raw.view(host.dtype)


def pinned_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A pinned host tensor with ``tensor``'s values, shape and strides."""
    host = torch.empty_strided(
        tensor.shape, tensor.stride(), dtype=tensor.dtype, device="cpu", pin_memory=True
    )
    host.copy_(tensor.detach())
    return host


def host_copy(param: torch.Tensor) -> torch.Tensor | None:
    """The host copy of an offloaded parameter, None if it is not offloaded."""
    return _HOST_COPIES.get(param)


def offload_parameter(param: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move ``param``'s values to host memory and return that host copy (idempotent).

    With ``device`` CUDA, the values go to pinned memory and ``param.data`` becomes a device view
    of it; the parameter's former GPU storage is released. With ``device`` CPU the parameter's
    own storage is the host copy.
    """
    host = _HOST_COPIES.get(param)
    if host is not None:
        return host
    if device.type == "cpu":
        if param.device.type != "cpu":
            raise ValueError(f"parameter on {param.device} cannot be offloaded for a CPU graph")
        host = param.data
    elif device.type == "cuda":
        host = pinned_copy(param.data)
        param.data = cuda_view_of_pinned(host, device)
    else:
        raise ValueError(f"offloading to {device.type} is not supported (cuda or cpu)")
    _HOST_COPIES[param] = host
    return host


class SlotPool:
    """``num_slots`` sets of static buffers on the compute device, one buffer per `SlotKey`.

    The buffers are allocated once and never reallocated: compiled graphs take them as static
    inputs and CUDA graphs bake their addresses in.
    """

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

    @property
    def nbytes(self) -> int:
        return sum(
            buf.untyped_storage().nbytes() for slot in self._buffers for buf in slot.values()
        )
