"""Put a model on the GPU without ever holding it whole there (``model.cuda()`` first would
not fit): the parameters the configuration offloads go to pinned host memory, the others to the
GPU, one at a time; the backend then finds the host copies already made.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .config import OffloadConfig
from .discovery import stack_of
from .host_memory import offload_parameters
from .planner import resolve_budget
from .planning import plan_prefetch, plan_uva, shared_parameters
from .runtime.registry import runtimes_of


@torch.no_grad()
def place_model(
    model: nn.Module,
    options: OffloadConfig | Mapping[str, Any] | None = None,
    device: torch.device | str = "cuda",
) -> nn.Module:
    """Place ``model`` (weights on the CPU) for the ``offload`` backend with the ``options`` later
    given to ``torch.compile``; returns it. Peak GPU memory is the resident weights alone."""
    config = OffloadConfig.from_options(options)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"place_model(device={str(device)!r}) needs a CUDA GPU and none is available; "
            "on a CPU-only machine use device='cpu' (offloading then runs with synchronous copies)"
        )
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    chosen = offloaded_parameters(model, config, device)
    offload_parameters(chosen, device)  # packed into shared pinned blocks
    offloaded = {id(p) for p in chosen}
    for param in model.parameters():
        if id(param) not in offloaded:
            param.data = param.data.to(device)
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            module._buffers[name] = buffer.to(device)
    return model


def offloaded_parameters(
    model: nn.Module, config: OffloadConfig, device: torch.device
) -> list[nn.Parameter]:
    """The parameters of ``model`` that ``config`` offloads on ``device`` (none without a
    backend); a ``gpu_memory_budget`` is planned here."""
    config = resolve_budget(config, model, device)
    if config.selected_backend == "prefetch":
        stack = stack_of(model, config.layers_path)
        plan = plan_prefetch(stack, config.prefetch, shared_parameters(stack.layers, model))
        return plan.parameters(stack.layers)
    if config.selected_backend == "uva":
        params = dict(model.named_parameters())
        return [params[name] for name in plan_uva(model, config.uva).params]
    return []


def reload_weights(model: nn.Module) -> None:
    """Make the next call of ``model``'s compiled graphs use its offloaded weights as they are
    now. Changes through a parameter, its ``.data`` or ``load_state_dict`` are found without it
    (by version counters); call it after writes no counter sees: through the storage itself
    (``untyped_storage()``, a NumPy or DLPack alias), through ``.data`` of an ``nn.Parameter``
    subclass, or before replaying a CUDA graph captured by hand (``offload_capturable``).
    """
    runtimes = runtimes_of(model)
    if not runtimes:
        raise ValueError(
            f"{type(model).__name__} has no offloaded layers in this process: compile it with "
            "backend='offload' (or place it with place_model) first"
        )
    for runtime in runtimes:
        runtime.reload()
