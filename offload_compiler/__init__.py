"""offload_compiler: weight offloading as a torch.compile backend.

``torch.compile(model, backend="offload", options={"prefetch": {...}})`` keeps the chosen layers'
weights in pinned host memory and compiles a graph that reads them from a small pool of GPU slot
buffers, filled ahead of use by asynchronous copies on a side stream.
"""

from torch._dynamo.backends import registry as _registry

from . import ops  # noqa: F401  (registers the custom ops before any compiled graph runs)
from .backend import offload_backend
from .config import OffloadConfig, PrefetchOffloadConfig, UVAOffloadConfig
from .loading import from_pretrained, init_empty_weights, load_checkpoint
from .placement import place_model, reload_weights
from .planner import BudgetError, Plan, plan
from .runtime.prefetcher import OffloadedStack
from .runtime.registry import offloaded_stacks
from .stalls import StallReport, measure_stalls

__all__ = [
    "BudgetError",
    "OffloadConfig",
    "OffloadedStack",
    "Plan",
    "PrefetchOffloadConfig",
    "StallReport",
    "UVAOffloadConfig",
    "from_pretrained",
    "init_empty_weights",
    "load_checkpoint",
    "measure_stalls",
    "offload_backend",
    "offloaded_stacks",
    "place_model",
    "plan",
    "reload_weights",
]


def _register_backend_name() -> None:
    """Register "offload" unless Dynamo is registering it from our entry point right now.

    ``lookup_backend("offload")`` imports this package through the ``torch_dynamo_backends``
    entry point and then registers the loaded function itself; registering the name here too
    would trip Dynamo's duplicate-name assertion.
    """
    name = "offload"
    if name in _registry._COMPILER_FNS or _registry._BACKENDS.get(name) is not None:
        return
    _registry.register_backend(offload_backend, name=name)


_register_backend_name()
