"""Which layers and parameters are offloaded, and which slot each layer uses (prefetch), or
which parameters stay in host memory (UVA). Pure bookkeeping: no memory is touched here.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from functools import cached_property

from torch import nn

from .config import PrefetchOffloadConfig, UVAOffloadConfig, matches_segments
from .discovery import Stack

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OffloadedLayer:
    """One offloaded block: its index in the stack and its place in the prefetch cycle."""

    index: int  # index in the stack (its position in the concatenation of several stacks)
    position: int  # k: rank among the offloaded layers
    slot: int  # k % prefetch_step
    params: tuple[str, ...]  # offloaded parameter names, relative to the block
    name: str  # the block's qualified name (model.layers.3)


@dataclass(frozen=True)
class OffloadPlan:
    """The offloaded layers of one stack (several concatenated), in execution order."""

    layers_path: str  # the stack's paths joined by "+"
    num_layers: int
    prefetch_step: int
    layers: tuple[OffloadedLayer, ...]

    @property
    def num_slots(self) -> int:
        return min(self.prefetch_step, len(self.layers))

    def parameters(self, layers: nn.Module) -> list[nn.Parameter]:
        """The offloaded parameters of ``layers`` (the stack's blocks), in plan order."""
        chosen = []
        for layer in self.layers:
            params = dict(layers[layer.index].named_parameters())
            chosen += [params[name] for name in layer.params]
        return chosen

    def layer_at(self, index: int) -> OffloadedLayer | None:
        """The offloaded layer with stack index ``index``, None if it stays resident."""
        return self._by_index.get(index)

    def next_in_slot(self, layer: OffloadedLayer) -> OffloadedLayer:
        """The layer copied into ``layer``'s slot once ``layer`` is done with it: the one
        ``prefetch_step`` ahead, past the last the slot's first user in the next forward (not
        ``(k + step) % n``, which could overwrite a slot before its reader ran)."""
        ahead = layer.position + self.prefetch_step
        if ahead < len(self.layers):
            return self.layers[ahead]
        return self.layers[layer.slot]

    @cached_property
    def _by_index(self) -> dict[int, OffloadedLayer]:
        return {layer.index: layer for layer in self.layers}


def shared_parameters(layers: nn.Module, root: nn.Module | None) -> set[int]:
    """Ids of the layers' parameters also used outside their own layer (tied weights): read
    while the layer's slot is refilled for the next, they stay resident."""
    owners: dict[int, set[int]] = {}
    for index, block in enumerate(layers):
        for param in block.parameters():
            owners.setdefault(id(param), set()).add(index)
    shared = {key for key, blocks in owners.items() if len(blocks) > 1}
    if root is not None:
        inside = {id(module) for module in layers.modules()}
        for module in root.modules():
            if id(module) not in inside:
                shared.update(id(p) for p in module.parameters(recurse=False) if id(p) in owners)
    return shared


def plan_prefetch(
    stack: Stack, config: PrefetchOffloadConfig, shared: Collection[int] = ()
) -> OffloadPlan:
    """Choose the offloaded layers (``offload_layers``, or ``i % group >= group - num_in_group``
    over the stack's blocks, several stacks concatenated) and their params: those not in
    ``shared`` and matching the layer's patterns (when set); a layer left with none is not
    offloaded."""
    layers, layers_path = stack.layers, stack.name
    chosen: list[OffloadedLayer] = []
    for index in config.offloaded_layers(len(layers)):
        block = stack.block_name(index)
        named = list(layers[index].named_parameters())
        kept = [name for name, param in named if id(param) in shared]
        if kept:
            log.warning(
                "offload: %s: %s also used outside the layer; kept resident",
                block,
                ", ".join(kept),
            )
        names = tuple(
            name
            for name, param in named
            if id(param) not in shared
            and (
                not (patterns := config.layer_params(index))
                or matches_segments(f"{block}.{name}", patterns)
            )
        )
        if not names:
            continue
        position = len(chosen)
        slot = position % config.offload_prefetch_step
        chosen.append(OffloadedLayer(index, position, slot, names, block))
    if not chosen:
        raise ValueError(_selects_nothing(layers_path, len(layers), config))
    return OffloadPlan(layers_path, len(layers), config.offload_prefetch_step, tuple(chosen))


def _selects_nothing(path: str, num_layers: int, config: PrefetchOffloadConfig) -> str:
    """Why ``config`` offloads no layer of the ``num_layers`` blocks at ``path``: offloading
    that silently does nothing would leave a model that does not fit to fail later, elsewhere."""
    picked = config.offloaded_layers(num_layers)
    if not picked:
        group, num = config.offload_group_size, config.offload_num_in_group
        return (
            f"the prefetch config offloads no layer of {path} ({num_layers} layers): "
            f"offload_group_size {group} with offload_num_in_group {num} offloads layers "
            f"{group - num}..{group - 1} of each group of {group}, and {num_layers} layers "
            f"reach none of them; use a group size of at most {num_layers}"
        )
    return (
        f"the prefetch config offloads no parameter of {path}: layers {picked} were chosen, but "
        f"none of their parameters match offload_params {sorted(config.offload_params)} (or "
        "all are shared with other modules and stay resident)"
    )


@dataclass(frozen=True)
class UVAPlan:
    """Parameters kept in pinned host memory by the UVA backend, in model order."""

    params: tuple[str, ...]  # fully qualified names in the root module
    nbytes: int


def plan_uva(root: nn.Module, config: UVAOffloadConfig) -> UVAPlan:
    """Parameters in model order until ``cpu_offload_gb`` is reached, as vLLM's UVA offloader
    picks them: per parameter (a module may be split), only those matching
    ``cpu_offload_params`` when it is set; the last one may cross the budget."""
    budget = int(config.cpu_offload_gb * 2**30)
    chosen: list[str] = []
    total = 0
    for name, param in root.named_parameters():
        if total >= budget:
            break
        if config.cpu_offload_params and not matches_segments(name, config.cpu_offload_params):
            continue
        chosen.append(name)
        total += param.nbytes
    return UVAPlan(tuple(chosen), total)
