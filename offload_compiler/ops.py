"""The custom ops the FX pass inserts: ``offload::wait_prefetch``, ``start_prefetch``, ``join``.

Each op returns nothing and declares that it mutates ``anchors``: activations of the graph (and
a per-graph token, first in the list). That gives AOTAutograd and Inductor a data dependency to
respect, so the ops are neither removed nor reordered against the kernels that read the slots:
  - wait_prefetch mutates the live activations that flow into the layer, so every kernel that
    reads the layer's slots runs after it;
  - start_prefetch mutates every value computed from the layer's slots that is used later, so
    no kernel reading the slot can be scheduled, fused or recomputed after the copy starts;
  - the token, mutated by every op of one graph, chains them in graph order and gives
    join_after_forward something to mutate (an op that mutates nothing and returns nothing is
    dead code).
The slots themselves are never declared mutated: they are graph inputs, and a mutated input is
functionalized into a clone that the asynchronous copy would miss. The ops find their runtime by
id, so no stream, event or host tensor is an argument (a CPU tensor argument would also keep
cudagraph trees from capturing the graph).
"""

from __future__ import annotations

import torch

from .runtime.registry import get_fetcher, get_runtime


@torch.library.custom_op("offload::wait_prefetch", mutates_args=("anchors",))
def wait_prefetch(
    anchors: list[torch.Tensor], runtime_id: int, layer: int, param: str | None = None
) -> None:
    """Block the compute stream until ``layer``'s weights (or only ``param``) are in its slot."""
    get_runtime(runtime_id).wait(layer, param)


@torch.library.custom_op("offload::start_prefetch", mutates_args=("anchors",))
def start_prefetch(
    anchors: list[torch.Tensor], runtime_id: int, layer: int, param: str | None = None
) -> None:
    """Start copying ``layer``'s weights (or only ``param``) into its slot on the copy stream."""
    get_runtime(runtime_id).start(layer, param)


@torch.library.custom_op("offload::join_after_forward", mutates_args=("anchors",))
def join_after_forward(anchors: list[torch.Tensor], runtime_id: int, rejoin: bool) -> None:
    """End of the graph: rejoin the copy stream if ``rejoin`` (graphs run as CUDA graphs).

    Outside CUDA graphs the copies started for the next forward keep running into it (its waits
    use their events), which keeps the copy engine busy across the boundary.
    """
    if rejoin:
        get_runtime(runtime_id).join()


# The OpOverloads the FX pass inserts (FX names nodes after them, and Inductor lowers them).
WAIT_PREFETCH = torch.ops.offload.wait_prefetch.default
START_PREFETCH = torch.ops.offload.start_prefetch.default
JOIN_AFTER_FORWARD = torch.ops.offload.join_after_forward.default


@torch.library.custom_op("offload::fetch_param", mutates_args=())
def fetch_param(after: torch.Tensor, fetcher_id: int, index: int) -> torch.Tensor:
    """A device copy of UVA-offloaded parameter ``index``, made right where the graph needs it.

    ``after`` is read-only: an activation computed just before the use, so the copy is not
    hoisted to the top of the graph (which would keep every parameter on the device at once).
    """
    return get_fetcher(fetcher_id).fetch(index)


@fetch_param.register_fake
def _(after: torch.Tensor, fetcher_id: int, index: int) -> torch.Tensor:
    return get_fetcher(fetcher_id).empty_like(index)


FETCH_PARAM = torch.ops.offload.fetch_param.default
