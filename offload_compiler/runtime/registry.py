"""The process-wide registries of runtimes and fetchers, which the custom ops find by id. Held
weakly: dropping a model (and so its compiled graphs) frees its slots, host memory and streams.
Every compile of one model in a process shares one runtime.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import nn

from .prefetcher import OffloadedStack, OffloadRuntime
from .uva_fetcher import HostFetcher

if TYPE_CHECKING:
    from ..planning import OffloadPlan
    from ..schedule import Schedule

_T = TypeVar("_T")

_RUNTIMES: list[weakref.ref[OffloadRuntime]] = []
_BY_STACK: weakref.WeakKeyDictionary[nn.Module, OffloadRuntime] = weakref.WeakKeyDictionary()
_FETCHERS: list[weakref.ref[HostFetcher]] = []
_FETCHER_OF_ROOT: weakref.WeakKeyDictionary[nn.Module, HostFetcher] = weakref.WeakKeyDictionary()


def _registered(registry: list[weakref.ref[_T]], kind: str, index: int) -> _T:
    """What a compiled graph names by ``index`` in ``registry``, or an error saying why not."""
    found = registry[index]() if index < len(registry) else None
    if found is None:
        raise RuntimeError(
            f"offload {kind} {index} does not exist in this process: its model was dropped, or "
            "a compiled graph was loaded from a cache without compiling its model here first"
        )
    return found


def get_runtime(runtime_id: int) -> OffloadRuntime:
    """The runtime a compiled graph names by id."""
    return _registered(_RUNTIMES, "runtime", runtime_id)


def runtime_for(layers: nn.Module, plan: OffloadPlan, schedule: Schedule) -> OffloadRuntime:
    """The runtime of the stack ``layers`` (its blocks), created (weights moved to host, slots
    filled) on first use."""
    runtime = _BY_STACK.get(layers)
    if runtime is None:
        blocks = {id(block) for block in layers}
        for other in _live_runtimes():
            if blocks & {id(block) for block in other.blocks()}:
                raise ValueError(
                    f"{plan.layers_path} shares blocks with {other.plan.layers_path}, which is "
                    "already offloaded: a model's stacks are offloaded together once per process. "
                    "Call offload_compiler.place_model(model, options) before compiling parts of "
                    "it (an encoder) on their own."
                )
        runtime = OffloadRuntime(len(_RUNTIMES), layers, plan, schedule)
        _RUNTIMES.append(weakref.ref(runtime))
        _BY_STACK[layers] = runtime
    elif runtime.schedule.config_hash != schedule.config_hash or runtime.device != schedule.device:
        raise ValueError(
            f"{plan.layers_path} is already offloaded with another configuration or device "
            f"({runtime.device}); one model can be offloaded one way per process"
        )
    else:
        runtime.bind(layers)
    return runtime


def runtimes_of(model: nn.Module) -> list[OffloadRuntime]:
    """The runtimes of ``model``'s offloaded stacks."""
    modules = {id(module) for module in model.modules()}
    return [r for r in _live_runtimes() if any(id(block) in modules for block in r.blocks())]


def _live_runtimes() -> list[OffloadRuntime]:
    return [runtime for ref in _RUNTIMES if (runtime := ref()) is not None]


def offloaded_stacks(model: nn.Module) -> list[OffloadedStack]:
    """The stacks of ``model`` offloaded in this process (once its compile has run)."""
    return [runtime.stack() for runtime in runtimes_of(model)]


def get_fetcher(fetcher_id: int) -> HostFetcher:
    """The fetcher a compiled graph names by id."""
    return _registered(_FETCHERS, "fetcher", fetcher_id)


def fetcher_for(root: nn.Module, hosts: list[torch.Tensor], device: torch.device) -> HostFetcher:
    """The fetcher of ``root``'s UVA-offloaded parameters (``hosts``, in plan order)."""
    fetcher = _FETCHER_OF_ROOT.get(root)
    if fetcher is None:
        fetcher = HostFetcher(len(_FETCHERS), hosts, device)
        _FETCHERS.append(weakref.ref(fetcher))
        _FETCHER_OF_ROOT[root] = fetcher
    elif [id(h) for h in fetcher.hosts] != [id(h) for h in hosts]:
        raise ValueError("this model's parameters are already offloaded another way")
    return fetcher
