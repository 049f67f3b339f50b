"""Host memory of offloaded weights: pinned host copies, and parameters that read them.

An offloaded parameter keeps exactly one copy of its values, in pinned host memory (pageable
memory would make every ``non_blocking`` copy synchronous). On CUDA the ``Parameter`` itself is
re-pointed at a CUDA view of that pinned memory (unified addressing), so ``state_dict()``, eager
calls and Dynamo's tracing read the true weights using no GPU memory. On a CPU-only machine the
parameter's own tensor is the host copy. PyTorch's pinned allocator rounds every request up to a
power of two, so parameters offloaded together are packed into a few power-of-two blocks.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .sharding import local, wrapped_like

# Parameter -> its host copy, shared by `place_model` and the backend. Weak, so a dropped model
# frees its pinned memory; by identity, as a WeakKeyDictionary would compare tensors with ==.
_HOST_COPIES = WeakIdKeyDictionary()


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
    """A CUDA tensor that reads and writes ``host`` (pinned) in place, using no GPU memory (for
    memory pinned by PyTorch the device address is the host address: unified addressing)."""
    if not host.is_pinned():
        raise ValueError("a device view needs pinned host memory")
    with torch.cuda.device(device):
        raw = torch.as_tensor(_CudaArrayInterface(host), device=device)
    return raw.view(host.dtype)


_ALIGN = 4096  # offsets in a block: a page, so every copy starts page-aligned
_MAX_BLOCK = 1 << 30  # the largest block opened for many tensors (a larger one gets its own)


@dataclass(frozen=True)
class PinnedBlocks:
    """Where tensors go in pinned memory: block sizes, and per tensor its block and offset."""

    block_bytes: tuple[int, ...]
    places: tuple[tuple[int, int], ...]  # per request, in request order: (block, byte offset)


def plan_pinned_blocks(
    sizes: Sequence[int], max_block: int = _MAX_BLOCK, align: int = _ALIGN
) -> PinnedBlocks:
    """Pack requests of ``sizes`` bytes into power-of-two blocks, first fit, largest first. A
    request that fits in no open block opens one of the largest power of two not above the bytes
    still to place (at most ``max_block``), at least the request rounded up to a power of two.
    Requests start at multiples of ``align``; zero-byte requests take ``align`` bytes."""
    padded = [max(align, -(-size // align) * align) for size in sizes]
    places: dict[int, tuple[int, int]] = {}  # request -> (block, offset)
    blocks: list[int] = []
    used: list[int] = []
    left = sum(padded)
    for i in sorted(range(len(sizes)), key=lambda i: -padded[i]):
        size = padded[i]
        block = next((b for b, cap in enumerate(blocks) if cap - used[b] >= size), None)
        if block is None:
            largest_not_above_left = 1 << (left.bit_length() - 1)
            blocks.append(max(1 << (size - 1).bit_length(), min(max_block, largest_not_above_left)))
            used.append(0)
            block = len(blocks) - 1
        places[i] = (block, used[block])
        used[block] += size
        left -= size
    return PinnedBlocks(tuple(blocks), tuple(places[i] for i in range(len(sizes))))


def _storage_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor with ``tensor``'s shape and strides spans, from its first element."""
    if tensor.numel() == 0:
        return 0
    extent = 1 + sum((n - 1) * st for n, st in zip(tensor.shape, tensor.stride(), strict=True))
    return extent * tensor.element_size()


def _pinned_block(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


class PinnedArena:
    """Pinned host tensors shaped like ``tensors``, carved from shared power-of-two blocks (a
    block is freed with its last view). ``allocate`` makes a block (a test may pass unpinned)."""

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        allocate: Callable[[int], torch.Tensor] = _pinned_block,
    ) -> None:
        sizes = [_storage_bytes(t) for t in tensors]
        plan = plan_pinned_blocks(sizes)
        self.blocks = [allocate(size) for size in plan.block_bytes]
        self._views = [
            (t.shape, t.stride(), t.dtype, nbytes, block, offset)
            for t, nbytes, (block, offset) in zip(tensors, sizes, plan.places, strict=True)
        ]

    def empty(self, index: int) -> torch.Tensor:
        """Uninitialised host memory with the shape, strides and dtype of ``tensors[index]``."""
        shape, stride, dtype, nbytes, block, offset = self._views[index]
        raw = self.blocks[block][offset : offset + nbytes]
        return raw.view(dtype).as_strided(shape, stride)


class OffloadedParameter(nn.Parameter):
    """An offloaded ``nn.Parameter`` whose every change shows in its version counter, since
    slots filled ahead of use must be refilled when the host copy changes (`refresh`). A plain
    ``param.data`` has a counter of its own, so here ``.data`` is ``detach()``, which shares the
    parameter's (``param.data.copy_(w)`` counts), and assigning ``.data`` bumps it too."""

    @property
    def data(self) -> torch.Tensor:
        return self.detach()

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        torch._C.TensorBase.data.__set__(self, value)
        torch.autograd.graph.increment_version(self)


def mark_offloaded(param: torch.Tensor) -> None:
    """Make ``param`` an `OffloadedParameter` (one of another subclass keeps its class: changes
    through its ``.data`` are then seen only by `offload_compiler.reload_weights`)."""
    if type(param) is nn.Parameter:
        param.__class__ = OffloadedParameter
    elif not isinstance(param, OffloadedParameter):
        warnings.warn(
            f"offload: a parameter of class {type(param).__qualname__} is offloaded as it is: "
            "the compiled model does not notice writes through its .data; after such writes, "
            "call offload_compiler.reload_weights(model)",
            stacklevel=2,
        )


def remember_host_copy(param: torch.Tensor, host: torch.Tensor) -> None:
    """Record ``host`` as ``param``'s host copy and make ``param`` an `OffloadedParameter`."""
    _HOST_COPIES[param] = host
    mark_offloaded(param)


def host_copy(param: torch.Tensor) -> torch.Tensor | None:
    """The host copy of an offloaded parameter, None if it is not offloaded."""
    return _HOST_COPIES.get(param)


def offload_parameters(params: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Move each of ``params``' values (a DTensor's local shard) to host memory and return those
    host copies (a parameter offloaded before keeps its copy): on CUDA into a `PinnedArena`, each
    ``param.data`` becoming a device view, its former storage freed before the next copy; on CPU
    in place."""
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"offloading to {device.type} is not supported (cuda or cpu)")
    if device.type == "cpu":
        moved = [p for p in params if p.device.type != "cpu" and _HOST_COPIES.get(p) is None]
        if moved:
            raise ValueError(f"parameter on {moved[0].device} cannot be offloaded for a CPU graph")
    new = list({id(p): p for p in params if _HOST_COPIES.get(p) is None}.values())
    shards = [local(p.detach()) for p in new]  # a tensor-parallel rank offloads its shard only
    arena = PinnedArena(shards) if device.type == "cuda" and new else None
    for index, (param, shard) in enumerate(zip(new, shards, strict=True)):
        if arena is None:
            host = shard
        else:
            host = arena.empty(index).copy_(shard)
            param.data = wrapped_like(param, cuda_view_of_pinned(host, device))
        remember_host_copy(param, host)
    return [_HOST_COPIES[p] for p in params]


def adopt_values(param: torch.Tensor, host: torch.Tensor, name: str, device: torch.device) -> None:
    """Make ``host`` the offloaded storage of ``param`` again after ``param`` was given other
    storage (``param.data = new``, ``load_state_dict(assign=True)``): its values are copied into
    ``host`` (whose address compiled graphs keep), which ``param`` then reads."""
    value = local(param.detach())  # a tensor-parallel rank's host copy is its shard
    if host.data_ptr() != value.data_ptr():
        if (value.shape, value.stride(), value.dtype) != (host.shape, host.stride(), host.dtype):
            raise ValueError(
                f"offloaded parameter {name} was replaced by a tensor of shape "
                f"{tuple(value.shape)}, strides {value.stride()} and {value.dtype}; its host copy "
                f"is {tuple(host.shape)}, {host.stride()}, {host.dtype}. Change offloaded weights "
                "in place (param.copy_, load_state_dict) or with the same layout."
            )
        host.copy_(value)  # synchronous: the values are in place when it returns
        stored = cuda_view_of_pinned(host, device) if device.type == "cuda" else host
        param.data = wrapped_like(param, stored)
    remember_host_copy(param, host)
