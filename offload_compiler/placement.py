"""Put a model on the GPU without ever holding it whole there.

A model whose weights do not fit on the GPU cannot be moved with ``model.cuda()`` and offloaded
afterwards. `place_model` walks the parameters of a model built on the CPU one at a time: those
the configuration offloads (the prefetch backend's layers, or the UVA backend's parameters in
model order up to its budget) go to pinned host memory (the parameter becomes a zero-memory CUDA
view of it; the pinned blocks are allocated first, then filled one parameter at a time), all
others to the GPU. The backend then finds the host copies already made.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .config import OffloadConfig
from .discovery import layer_list_of
from .host_memory import offload_parameters
from .planning import plan_prefetch, plan_uva, shared_parameters
from .runtime.registry import runtimes_of


@torch.no_grad()
def place_model(
    model: nn.Module,
    options: OffloadConfig | Mapping[str, Any] | None = None,
    device: torch.device | str = "cuda",
) -> nn.Module:
    """Place ``model`` for the ``offload`` backend with ``options``; returns ``model``.

    Call it on a model whose weights are on the CPU, with the options later given to
    ``torch.compile``. Peak GPU memory is the resident weights alone.
    """
    config = OffloadConfig.from_options(options)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"place_model(device={str(device)!r}) needs a CUDA GPU and none is available; "
            "on a CPU-only machine use device='cpu' (offloading then runs with synchronous copies)"
        )
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    chosen = offloaded_parameters(model, config)
    offload_parameters(chosen, device)  # packed into shared pinned blocks
    offloaded = {id(p) for p in chosen}
    for param in model.parameters():
        if id(param) not in offloaded:
            param.data = param.data.to(device)
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            module._buffers[name] = buffer.to(device)
    return model


def offloaded_parameters(model: nn.Module, config: OffloadConfig) -> list[nn.Parameter]:
    """The parameters of ``model`` that ``config`` offloads: the prefetch plan's layers'
    parameters, or UVA's in model order up to its budget (none without a backend)."""
    if config.selected_backend == "prefetch":
        found = layer_list_of(model, config.layers_path)
        layers = found.layers
        plan = plan_prefetch(layers, found.path, config.prefetch, shared_parameters(layers, model))
        return plan.parameters(layers)
    if config.selected_backend == "uva":
        params = dict(model.named_parameters())
        return [params[name] for name in plan_uva(model, config.uva).params]
    return []


def reload_weights(model: nn.Module) -> None:
    """Make the next call of ``model``'s compiled graphs use its offloaded weights as they are
    now, however they were written.

    Changes through a parameter, its ``.data`` or ``load_state_dict`` are found without it
    (each call checks the parameters' version counters). Call it after writes no version
    counter sees: through the storage itself (``untyped_storage()``, a NumPy or DLPack alias),
    through ``.data`` of a parameter of an ``nn.Parameter`` subclass, or before replaying a
    CUDA graph captured by hand (``prefetch.offload_capturable``), whose replays run no Python.
    """
    runtimes = runtimes_of(model)
    if not runtimes:
        raise ValueError(
            f"{type(model).__name__} has no offloaded layers in this process: compile it with "
            "backend='offload' (or place it with place_model) first"
        )
    for runtime in runtimes:
        runtime.reload()
