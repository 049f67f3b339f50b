"""The custom ops the FX passes insert: ``offload::wait_prefetch``, ``start_prefetch``,
``join_after_forward`` and UVA's ``fetch_param``.

Each prefetch op returns nothing and declares that it mutates ``anchors`` (activations, a token
first): the data dependency that keeps AOTAutograd and Inductor from removing or reordering it
against the slots' readers. passes/README.md states the invariants the ops keep.
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
    """End of the graph: rejoin the copy stream if ``rejoin`` (graphs run as CUDA graphs);
    otherwise the copies started for the next forward keep the copy engine busy into it."""
    if rejoin:
        get_runtime(runtime_id).join()


# The OpOverloads the FX pass inserts (FX names nodes after them, and Inductor lowers them).
WAIT_PREFETCH = torch.ops.offload.wait_prefetch.default
START_PREFETCH = torch.ops.offload.start_prefetch.default
JOIN_AFTER_FORWARD = torch.ops.offload.join_after_forward.default


@torch.library.custom_op("offload::fetch_param", mutates_args=())
def fetch_param(after: torch.Tensor, fetcher_id: int, index: int) -> torch.Tensor:
    """A device copy of UVA-offloaded parameter ``index``, made right where the graph needs it:
    ``after``, read-only, is an activation computed just before the use, so the copy is not
    hoisted to the top (which would keep every parameter on the device at once)."""
    return get_fetcher(fetcher_id).fetch(index)


@fetch_param.register_fake
def _(after: torch.Tensor, fetcher_id: int, index: int) -> torch.Tensor:
    return get_fetcher(fetcher_id).empty_like(index)


FETCH_PARAM = torch.ops.offload.fetch_param.default
