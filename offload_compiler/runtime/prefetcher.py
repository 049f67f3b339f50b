"""The prefetch runtime of one offloaded stack: its host copies, its slots, and the
ordering of the copies into the slots (events, `event_order`; counters, `counter_order`; or
synchronous copies without a GPU), which the custom ops drive (`ops`).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..host_memory import adopt_values, offload_parameters
from ..planning import OffloadedLayer, OffloadPlan
from ..sharding import wrapped_like
from .counter_order import CounterOrder, GraphProgram
from .event_order import EventOrder, SyncOrder
from .slots import SlotKey, SlotPool
from .wait_timer import WaitTimer

if TYPE_CHECKING:
    from ..schedule import Schedule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OffloadedStack:
    """What the prefetch backend offloaded of one stack of a model (several stacks, such as an
    encoder's and a decoder's blocks, form one)."""

    layers_path: str
    """The stack's path, or its paths joined by ``+``."""
    layers: tuple[int, ...]
    """Indices of the offloaded layers in the stack (the concatenation of several), in copy
    order."""
    layer_names: tuple[str, ...]
    """Their qualified names (``decoder.block.2``)."""
    host_tensors: tuple[torch.Tensor, ...] = field(repr=False)
    """The offloaded parameters' host copies (pinned on CUDA), in copy order."""
    host_bytes: int
    slot_bytes: int
    """GPU memory of the slot buffers the offloaded layers share."""


class OffloadRuntime:
    """Host copies, slot buffers and copy ordering of one offloaded stack."""

    def __init__(
        self, runtime_id: int, layers: nn.Module, plan: OffloadPlan, schedule: Schedule
    ) -> None:
        self.id = runtime_id
        self.plan = plan
        self.schedule = schedule
        self.device = schedule.device
        self.pool = SlotPool(plan.num_slots, self.device)
        params = plan.parameters(layers)
        hosts = iter(offload_parameters(params, self.device))
        # weakly: Dynamo drops its compiled graphs (which hold this runtime) only once the
        # parameters they guard are gone
        self._layers = weakref.ref(layers)
        self._params = [weakref.ref(p) for p in params]
        self._host: list[dict[str, torch.Tensor]] = []
        self._slots: list[dict[str, torch.Tensor]] = []  # what the copies write
        self._read: list[dict[str, torch.Tensor]] = []  # what the graph reads (DTensor shards)
        owners = iter(params)
        for layer in plan.layers:
            host = {name: next(hosts) for name in layer.params}
            self._host.append(host)
            slots = {n: self.pool.buffer(layer.slot, SlotKey.of(n, t)) for n, t in host.items()}
            self._slots.append(slots)
            self._read.append({n: wrapped_like(next(owners), slots[n]) for n in layer.params})
        self.host_bytes = sum(t.nbytes for host in self._host for t in host.values())
        poison = self._poison if schedule.poison_slots else None
        if self.device.type != "cuda":
            self._order: SyncOrder | CounterOrder = SyncOrder(plan, self._copy)
        elif schedule.counter_ordering:
            self._order = CounterOrder(plan, self._copy, self.device, poison)
        else:
            self._order = EventOrder(plan, self._copy, self.device, poison)
        self._versions = self._param_versions()
        self.timer: WaitTimer | None = None  # set while `measure_stalls` times the waits
        for layer in plan.layers[: plan.num_slots]:  # the first forward finds its slots filled
            self._order.start(layer, layer.params)
        self._order.join()

    def calling(self, graph: GraphProgram) -> contextlib.AbstractContextManager[None]:
        """Wrap each call of a compiled graph that cudagraph trees run (host-issued copies)."""
        assert isinstance(self._order, CounterOrder)
        return self._order.counters.calling(graph)

    def slot_tensors(self, layer_index: int) -> dict[str, torch.Tensor]:
        """The slot buffers the compiled graph reads for layer ``layer_index``'s parameters."""
        return self._read[self._layer(layer_index).position]

    def start(self, layer_index: int, name: str | None = None) -> None:
        """Begin copying layer ``layer_index``'s weights (or parameter ``name``) into its slot."""
        layer = self._layer(layer_index)
        self._order.start(layer, layer.params if name is None else (name,))

    def wait(self, layer_index: int, name: str | None = None) -> None:
        """Make the compute stream wait until layer ``layer_index``'s slot holds its weights."""
        layer = self._layer(layer_index)
        if self.timer is None:
            self._order.wait(layer, layer.params if name is None else (name,))
            return
        self.timer.before(layer.position)
        self._order.wait(layer, layer.params if name is None else (name,))
        self.timer.after()

    def join(self) -> None:
        """Rejoin the copy stream into the compute stream (op join_after_forward)."""
        self._order.join()

    def blocks(self) -> list[nn.Module]:
        """The stack's blocks (none once the model is gone)."""
        layers = self._layers()
        return [] if layers is None else list(layers)

    def stack(self) -> OffloadedStack:
        """This runtime as the public `OffloadedStack`."""
        return OffloadedStack(
            self.plan.layers_path,
            tuple(layer.index for layer in self.plan.layers),
            tuple(layer.name for layer in self.plan.layers),
            tuple(t for host in self._host for t in host.values()),
            self.host_bytes,
            self.pool.nbytes,
        )

    def refresh(self) -> None:
        """Before each call of a compiled graph: `reload` if an offloaded parameter changed since
        the last call (the first slots were filled at the end of the previous call)."""
        if self._param_versions() != self._versions:
            self.reload()

    def bind(self, layers: nn.Module) -> None:
        """Take the Parameters ``layers`` hold now as the offloaded ones, if they are others
        (``load_state_dict(assign=True)`` makes new ones; a compile follows it)."""
        params = self.plan.parameters(layers)
        if any(new is not old() for new, old in zip(params, self._params, strict=True)):
            self._params = [weakref.ref(p) for p in params]
            self.reload()

    def reload(self) -> None:
        """Re-read every offloaded parameter (values given in other storage go into the host
        copies) and copy every slot's contents again; `offload_compiler.reload_weights` calls it
        for writes no version counter sees."""
        if any(ref() is None for ref in self._params) and (layers := self._layers()) is not None:
            self._params = [weakref.ref(p) for p in self.plan.parameters(layers)]
        units = [(layer, name) for layer in self.plan.layers for name in layer.params]
        for ref, (layer, name) in zip(self._params, units, strict=True):
            if (param := ref()) is None:
                continue  # the model is gone
            where = f"{layer.name}.{name}"
            adopt_values(param, self._host[layer.position][name], where, self.device)
        self._versions = self._param_versions()
        log.info("offload: %s: weights changed; slots filled again", self.plan.layers_path)
        self._order.copy_again()

    def _param_versions(self) -> list[int]:
        """Per offloaded parameter its version, -1 where it is gone (`reload` takes the new one)."""
        return [-1 if (param := ref()) is None else param._version for ref in self._params]

    def _copy(self, position: int, name: str) -> None:
        self._slots[position][name].copy_(self._host[position][name], non_blocking=True)

    def _poison(self, position: int, name: str) -> None:
        """A kernel reading this slot after this point reads NaN (``poison_slots``)."""
        slot = self._slots[position][name]
        if slot.is_floating_point():
            slot.fill_(float("nan"))

    def _layer(self, layer_index: int) -> OffloadedLayer:
        layer = self.plan.layer_at(layer_index)
        if layer is None:
            raise RuntimeError(f"layer {layer_index} of {self.plan.layers_path} is not offloaded")
        return layer
