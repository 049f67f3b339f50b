"""The prefetch machinery behind the custom ops: slots, the copy stream and per-layer events.

One `OffloadRuntime` serves one offloaded ModuleList for the life of the process; every graph
compiled from that model (graph breaks, recompiles) shares it, so weights are copied to host
memory once and the slot pool is allocated once. Compiled graphs name it by an integer id,
looked up when an op runs, so no tensor, stream or event is baked into a graph or a cache entry.

The protocol on CUDA, per unit (a whole offloaded layer k, or with offload_per_param one of its
parameters; slot s = k % prefetch_step):
  start(k): the compute stream records ``ready[k]`` (the previous reader of slot s is queued
            before this point), the copy stream waits on it, copies host -> slot, records
            ``done[k]``.
  wait(k):  the compute stream waits on ``done[k]``.
  join():   the compute stream waits on the copy stream, at the end of graphs that run as CUDA
            graphs: a copy stream forked from the capturing stream must rejoin before capture
            ends, and no event may cross from one captured graph into another. Other graphs
            skip it, so the copies for the next forward overlap its first layers.
Streams are looked up when an op runs, never cached at trace time, because cudagraph trees run
warm-up and capture on their own stream. On CPU start(k) is a synchronous copy and wait/join are
no-ops, so the compiled graph is the same and a misplaced op gives wrong numbers there too.

With host copies (``prefetch.offload_host_copies``, the default on CUDA) the events give way to
counters in device memory (`counters`): the same start/wait points, but a CUDA graph captures
only kernels on the counters, and the host issues its copies after each replay (`calling`).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import nn

from .counters import CudaCounters, GraphProgram, SlotCounters, counters_available
from .planning import OffloadedLayer, OffloadPlan
from .pool import SlotKey, SlotPool, adopt_values, offload_parameters

log = logging.getLogger(__name__)

Unit = tuple[int, str | None]  # (offloaded position, parameter name or None for all)
_T = TypeVar("_T")

_RUNTIMES: list[OffloadRuntime] = []
_BY_LAYER_LIST: weakref.WeakKeyDictionary[nn.ModuleList, OffloadRuntime] = (
    weakref.WeakKeyDictionary()
)


def _registered(registry: list[_T], kind: str, index: int) -> _T:
    """What a compiled graph names by ``index`` in ``registry``, with an error that says why
    it may be missing."""
    try:
        return registry[index]
    except IndexError:
        raise RuntimeError(
            f"offload {kind} {index} does not exist in this process: a compiled graph was "
            "loaded from a cache without compiling its model here first"
        ) from None


def get_runtime(runtime_id: int) -> OffloadRuntime:
    """The runtime a compiled graph names by id."""
    return _registered(_RUNTIMES, "runtime", runtime_id)


def runtime_for(
    layers: nn.ModuleList,
    plan: OffloadPlan,
    device: torch.device,
    config_hash: str,
    poison_slots: bool,
    host_copies: bool = False,
) -> OffloadRuntime:
    """The runtime of ``layers``, created (weights moved to host, slots filled) on first use."""
    runtime = _BY_LAYER_LIST.get(layers)
    if runtime is None:
        runtime = OffloadRuntime(
            len(_RUNTIMES), layers, plan, device, config_hash, poison_slots, host_copies
        )
        _RUNTIMES.append(runtime)
        _BY_LAYER_LIST[layers] = runtime
    elif runtime.config_hash != config_hash or runtime.device != device:
        raise ValueError(
            f"{plan.layers_path} is already offloaded with another configuration or device "
            f"({runtime.device}); one model can be offloaded one way per process"
        )
    else:
        runtime.bind(layers)
    return runtime


@dataclass(frozen=True)
class OffloadedStack:
    """What the prefetch backend offloaded of one ModuleList of a model."""

    layers_path: str
    layers: tuple[int, ...]
    """Indices of the offloaded layers, in copy order."""
    host_tensors: tuple[torch.Tensor, ...] = field(repr=False)
    """The offloaded parameters' host copies (pinned on CUDA), in copy order."""
    host_bytes: int
    slot_bytes: int
    """GPU memory of the slot buffers the offloaded layers share."""


def offloaded_stacks(model: nn.Module) -> list[OffloadedStack]:
    """The ModuleLists of ``model`` the prefetch backend offloads in this process (known once
    the compiled model was first called: the compile allocates the slots)."""
    return [runtime.stack() for runtime in runtimes_of(model)]


def runtimes_of(model: nn.Module) -> list[OffloadRuntime]:
    """The runtimes of ``model``'s offloaded ModuleLists."""
    found = (_BY_LAYER_LIST.get(m) for m in model.modules() if isinstance(m, nn.ModuleList))
    return [runtime for runtime in found if runtime is not None]


class OffloadRuntime:
    """Host copies, slot buffers, copy stream and events (or counters) of one offloaded
    ModuleList."""

    def __init__(
        self,
        runtime_id: int,
        layers: nn.ModuleList,
        plan: OffloadPlan,
        device: torch.device,
        config_hash: str,
        poison_slots: bool,
        host_copies: bool = False,
    ) -> None:
        self.id = runtime_id
        self.config_hash = config_hash
        self.plan = plan
        self.device = device
        self.poison_slots = poison_slots
        self.pool = SlotPool(plan.num_slots, device)
        self._host: list[dict[str, torch.Tensor]] = []
        self._slots: list[dict[str, torch.Tensor]] = []
        # packed into shared pinned blocks
        self._params = plan.parameters(layers)
        hosts = iter(offload_parameters(self._params, device))
        for layer in plan.layers:
            host = {name: next(hosts) for name in layer.params}
            self._host.append(host)
            self._slots.append(
                {n: self.pool.buffer(layer.slot, SlotKey.of(n, t)) for n, t in host.items()}
            )
        self.host_bytes = sum(t.nbytes for host in self._host for t in host.values())
        # A unit of copying is a whole layer (position, None) or one parameter (position, name).
        self._slot_owner: dict[tuple[int, str], int] = {}  # (slot, name) -> position held
        # units started and not yet waited for or joined -> started inside a CUDA graph capture
        self._pending: dict[Unit, bool] = {}
        self._cuda = device.type == "cuda"
        if self._cuda:
            self._copy_stream = torch.cuda.Stream(device)
        # one counter pair per (slot, parameter name), a layer's consecutive where they can be
        self._entity: dict[tuple[int, str], int] = {}
        for layer in plan.layers:
            for name in layer.params:
                self._entity.setdefault((layer.slot, name), len(self._entity))
        self._counters: SlotCounters | None = None
        if self._cuda and host_copies:
            unavailable = counters_available(device)
            if unavailable is None:
                names = {e: name for (_, name), e in self._entity.items()}

                def copy_tensor(entity: int, position: int) -> None:
                    name = names[entity]
                    self._slots[position][name].copy_(self._host[position][name], non_blocking=True)

                cuda = CudaCounters(len(self._entity), device, self._copy_stream, copy_tensor)
                self._counters = SlotCounters(len(self._entity), cuda)
            else:
                log.info("offload: copies stay inside CUDA graphs (%s)", unavailable)
        if self._cuda and self._counters is None:  # copies ordered by events instead
            units: list[Unit] = [(layer.position, None) for layer in plan.layers]
            units += [(layer.position, name) for layer in plan.layers for name in layer.params]
            with torch.cuda.device(device):  # created ahead: none may be created in a capture
                self._ready = {unit: torch.cuda.Event() for unit in units}
                self._done = {unit: torch.cuda.Event() for unit in units}
        self._versions = self._param_versions()
        for layer in plan.layers[: plan.num_slots]:  # the first forward finds its slots filled
            self._start(layer, None)
        self.join()

    def stack(self) -> OffloadedStack:
        """This runtime as the public `OffloadedStack`."""
        return OffloadedStack(
            self.plan.layers_path,
            tuple(layer.index for layer in self.plan.layers),
            tuple(t for host in self._host for t in host.values()),
            self.host_bytes,
            self.pool.nbytes,
        )

    def refresh(self) -> None:
        """Called before each call of a compiled graph: if an offloaded parameter changed since
        the last call (in place, or given other storage), take its new values and copy again
        what the slots hold. The slots of the first offloaded layers are filled ahead, at the
        end of the previous call, from what the host copies held then."""
        if self._param_versions() != self._versions:
            self.reload()

    def bind(self, layers: nn.ModuleList) -> None:
        """Called at each compile: take the Parameters ``layers`` hold now (a new compile
        follows ``load_state_dict(assign=True)``, which makes new ones) as the offloaded ones."""
        params = self.plan.parameters(layers)
        if any(new is not old for new, old in zip(params, self._params, strict=True)):
            self._params = params
            self.reload()

    def reload(self) -> None:
        """Re-read every offloaded parameter: values given in other storage go into the host
        copies, and every slot's contents are copied again. `refresh` calls it when a version
        counter moved; `offload_compiler.reload_weights` for writes no counter sees."""
        hosts = (
            self._host[layer.position][name] for layer in self.plan.layers for name in layer.params
        )
        names = (
            f"{self.plan.layers_path}.{layer.index}.{name}"
            for layer in self.plan.layers
            for name in layer.params
        )
        for param, host, name in zip(self._params, hosts, names, strict=True):
            adopt_values(param, host, name, self.device)
        self._versions = self._param_versions()
        log.info("offload: %s: weights changed; slots filled again", self.plan.layers_path)
        if self._counters is not None:
            for e, position in enumerate(self._counters.pending):
                if position is not None:
                    self._counters.start(position, [e])
            return
        for (_, name), position in self._slot_owner.items():
            self._start(self.plan.layers[position], name)
        if self._cuda:
            self.join()  # a CUDA graph replayed next waits on its own copies only

    def _param_versions(self) -> list[int]:
        return [param._version for param in self._params]

    @property
    def host_copies(self) -> bool:
        """Whether CUDA graphs of this runtime leave the copies to the host (`calling`)."""
        return self._counters is not None

    def calling(self, graph: GraphProgram) -> contextlib.AbstractContextManager[None]:
        """Wrap each call of a compiled graph that cudagraph trees run (host copies only)."""
        assert self._counters is not None
        return self._counters.calling(graph)

    def slot_tensors(self, layer_index: int) -> dict[str, torch.Tensor]:
        """The slot buffers the compiled graph reads for layer ``layer_index``'s parameters."""
        return self._slots[self._layer(layer_index).position]

    def start(self, layer_index: int, name: str | None = None) -> None:
        """Begin copying layer ``layer_index``'s weights (or only parameter ``name``) into its
        slot (op start_prefetch)."""
        self._start(self._layer(layer_index), name)

    def wait(self, layer_index: int, name: str | None = None) -> None:
        """Make the compute stream wait until layer ``layer_index``'s slot holds its weights
        (or parameter ``name``).

        If the slot holds another layer (a forward that skipped layers, or a layer split across
        two graphs by a graph break), the copy is started here first: slower, never wrong.
        """
        layer = self._layer(layer_index)
        names = layer.params if name is None else (name,)
        if self._counters is not None:
            self._counters.wait(layer.position, self._entities(layer, names))
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "wait(%d, %s): pending %s, capturing %s",
                layer_index,
                name,
                sorted(self._pending, key=str),
                self._cuda and torch.cuda.is_current_stream_capturing(),
            )
        if any(self._slot_owner.get((layer.slot, n)) != layer.position for n in names):
            self._start(layer, name)
        units = [(layer.position, None)]
        units += [(layer.position, n) for n in names] if name is None else [(layer.position, name)]
        self._check_capture([unit for unit in units if unit in self._pending])
        for unit in units:
            if self._pending.pop(unit, None) is not None:
                torch.cuda.current_stream(self.device).wait_event(self._done[unit])

    def join(self) -> None:
        """Rejoin the copy stream into the compute stream (op join_after_forward)."""
        log.debug("join(): pending %s", sorted(self._pending, key=str))
        if self._counters is not None:  # nothing of a capture is on the copy stream
            if not torch.cuda.is_current_stream_capturing():
                torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
            return
        if self._pending:
            self._check_capture(list(self._pending))
            self._pending.clear()
            torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)

    def _check_capture(self, units: list[Unit]) -> None:
        """Refuse to make a CUDA graph capture wait on copies started before it.

        CUDA would invalidate the capture with "dependency created on uncaptured work in another
        stream". It happens when a compile without the CUDA-graph schedule (default mode
        without ``prefetch.offload_capturable``), which leaves the next forward's first copies
        in flight when it returns, is captured by hand.
        """
        if not units or not torch.cuda.is_current_stream_capturing():
            return
        outside = [unit for unit in units if not self._pending[unit]]
        if outside:
            layers = sorted({self.plan.layers[position].index for position, _ in outside})
            raise RuntimeError(
                f"offload: a CUDA graph capture would wait on copies of layers {layers} of "
                f"{self.plan.layers_path} started before it: this model was compiled to leave "
                "the next forward's copies in flight. To capture it outside Inductor, compile "
                "with prefetch.offload_capturable=True (mode='reduce-overhead' needs nothing)."
            )

    def _entities(self, layer: OffloadedLayer, names: tuple[str, ...]) -> list[int]:
        return [self._entity[(layer.slot, n)] for n in names]

    def _layer(self, layer_index: int) -> OffloadedLayer:
        layer = self.plan.layer_at(layer_index)
        if layer is None:
            raise RuntimeError(f"layer {layer_index} of {self.plan.layers_path} is not offloaded")
        return layer

    def _start(self, layer: OffloadedLayer, name: str | None) -> None:
        log.debug("start(%d, %s)", layer.index, name)
        host, slots = self._host[layer.position], self._slots[layer.position]
        names = layer.params if name is None else (name,)
        for n in names:
            self._slot_owner[(layer.slot, n)] = layer.position
        if not self._cuda:
            for n in names:
                slots[n].copy_(host[n])
            return
        counters = self._counters
        if self.poison_slots:  # a kernel reading this slot after this point now reads NaN
            for n in names:
                # with counters, only a release (of a pending copy) orders the fill before the
                # copy; a slot with nothing pending has no reader to catch
                entity = self._entity[(layer.slot, n)]
                unread = counters is None or counters.pending[entity] is not None
                if slots[n].is_floating_point() and unread:
                    slots[n].fill_(float("nan"))
        if counters is not None:
            counters.start(layer.position, self._entities(layer, names))
            return
        compute = torch.cuda.current_stream(self.device)
        unit = (layer.position, name)
        ready, done = self._ready[unit], self._done[unit]
        ready.record(compute)
        self._copy_stream.wait_event(ready)
        with torch.cuda.stream(self._copy_stream):
            for n in names:
                slots[n].copy_(host[n], non_blocking=True)
        done.record(self._copy_stream)
        self._pending[unit] = torch.cuda.is_current_stream_capturing()


_FETCHERS: list[HostFetcher] = []
_FETCHER_OF_ROOT: weakref.WeakKeyDictionary[nn.Module, HostFetcher] = weakref.WeakKeyDictionary()


def get_fetcher(fetcher_id: int) -> HostFetcher:
    """The fetcher a compiled graph names by id."""
    return _registered(_FETCHERS, "fetcher", fetcher_id)


def fetcher_for(root: nn.Module, hosts: list[torch.Tensor], device: torch.device) -> HostFetcher:
    """The fetcher of ``root``'s UVA-offloaded parameters (``hosts``, in plan order)."""
    fetcher = _FETCHER_OF_ROOT.get(root)
    if fetcher is None:
        fetcher = HostFetcher(len(_FETCHERS), hosts, device)
        _FETCHERS.append(fetcher)
        _FETCHER_OF_ROOT[root] = fetcher
    elif [id(h) for h in fetcher.hosts] != [id(h) for h in hosts]:
        raise ValueError("this model's parameters are already offloaded another way")
    return fetcher


class HostFetcher:
    """Host copies that a graph copies to the device right before each use (op fetch_param).

    The UVA backend's fallback where the device cannot (or should not) read host memory in
    place. The copy runs on the current stream, so it is ordered with the kernels around it;
    its source is pinned, so it does not block the host, and under CUDA graph capture it is
    recorded with fixed addresses, the destination coming from the graph's memory pool.
    """

    def __init__(self, fetcher_id: int, hosts: list[torch.Tensor], device: torch.device) -> None:
        self.id = fetcher_id
        self.hosts = hosts
        self.device = device

    def fetch(self, index: int) -> torch.Tensor:
        return self.empty_like(index).copy_(self.hosts[index], non_blocking=True)

    def empty_like(self, index: int) -> torch.Tensor:
        """An uninitialised tensor like what ``fetch`` returns (also its fake for tracing)."""
        host = self.hosts[index]
        return torch.empty_strided(host.shape, host.stride(), dtype=host.dtype, device=self.device)
