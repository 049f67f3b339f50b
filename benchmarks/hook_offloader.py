"""Baseline: a prefetch offloader that patches module forwards at run time.

This is the approach vLLM's and sglang's prefetch offloaders take, written here to compare
against: each offloaded layer's parameters point at a shared GPU slot buffer, and the layer's
``forward`` is replaced by a wrapper that waits for its weights before calling the original and
starts the copy of the layer ``step`` ahead after it returns. The waits and starts are custom
ops that mutate the hidden state (as vLLM's ``wait_prefetch(input, i)`` and
``start_prefetch(output, i)``), so the wrapped model still runs under torch.compile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from offload_compiler import PrefetchOffloadConfig

_OFFLOADERS: list[HookPrefetchOffloader] = []


@torch.library.custom_op("bench_hook::wait", mutates_args=("hidden",))
def _wait(hidden: torch.Tensor, offloader: int, position: int) -> None:
    _OFFLOADERS[offloader].wait(position)


@torch.library.custom_op("bench_hook::start", mutates_args=("hidden",))
def _start(hidden: torch.Tensor, offloader: int, position: int) -> None:
    _OFFLOADERS[offloader].start(position)


@torch.library.custom_op("bench_hook::join", mutates_args=("hidden",))
def _join(hidden: torch.Tensor, offloader: int) -> None:
    _OFFLOADERS[offloader].join()


def pinned_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A pinned host tensor with ``tensor``'s values, shape and strides."""
    host = torch.empty_strided(
        tensor.shape, tensor.stride(), dtype=tensor.dtype, device="cpu", pin_memory=True
    )
    host.copy_(tensor.detach())
    return host


class HookPrefetchOffloader:
    """Offloads layers ``i % group >= group - num`` with ``step`` slots, by patching forwards."""

    def __init__(
        self, layers: nn.ModuleList, group: int, num: int, step: int, device: torch.device
    ) -> None:
        self.id = len(_OFFLOADERS)
        _OFFLOADERS.append(self)
        self.indices = PrefetchOffloadConfig(
            offload_group_size=group, offload_num_in_group=num, offload_prefetch_step=step
        ).offloaded_layers(len(layers))
        self.step = step
        self.device = device
        slots = min(step, len(self.indices))
        self.buffers: list[dict[str, torch.Tensor]] = [{} for _ in range(slots)]
        self.hosts: list[dict[str, torch.Tensor]] = []
        for position, index in enumerate(self.indices):
            buffers = self.buffers[position % slots]
            host = {}
            for name, param in layers[index].named_parameters():
                host[name] = pinned_copy(param.data) if device.type == "cuda" else param.data
                if name not in buffers:
                    buffers[name] = torch.empty_like(param.data, device=device)
                param.data = buffers[name]  # the layer now reads its slot
            self.hosts.append(host)
            layers[index].forward = self._wrap(layers[index].forward, position)
        self.host_tensors = [t for host in self.hosts for t in host.values()]
        """The offloaded parameters' host copies, in copy order."""
        self.offloaded_bytes = sum(t.nbytes for t in self.host_tensors)
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.stream = torch.cuda.Stream(device)
            self.done = [torch.cuda.Event() for _ in self.indices]
            self.ready = [torch.cuda.Event() for _ in self.indices]
        self.pending: set[int] = set()
        for position in range(slots):
            self.start(position)
        self.join()

    def _wrap(self, forward: Callable[..., Any], position: int) -> Callable[..., Any]:
        ahead = (position + self.step) % len(self.indices)
        last = position == len(self.indices) - 1

        def patched(*args: Any, **kwargs: Any) -> Any:
            hidden = args[0] if args else kwargs["hidden_states"]
            torch.ops.bench_hook.wait(hidden, self.id, position)
            out = forward(*args, **kwargs)
            out_tensor = out[0] if isinstance(out, tuple) else out
            torch.ops.bench_hook.start(out_tensor, self.id, ahead)
            if last:
                torch.ops.bench_hook.join(out_tensor, self.id)
            return out

        return patched

    def start(self, position: int) -> None:
        slots = self.buffers[position % len(self.buffers)]
        host = self.hosts[position]
        if not self.cuda:
            for name, tensor in host.items():
                slots[name].copy_(tensor)
            return
        self.ready[position].record(torch.cuda.current_stream(self.device))
        self.stream.wait_event(self.ready[position])
        with torch.cuda.stream(self.stream):
            for name, tensor in host.items():
                slots[name].copy_(tensor, non_blocking=True)
        self.done[position].record(self.stream)
        self.pending.add(position)

    def wait(self, position: int) -> None:
        if position in self.pending:
            self.pending.discard(position)
            torch.cuda.current_stream(self.device).wait_event(self.done[position])

    def join(self) -> None:
        if self.pending:
            self.pending.clear()
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
