"""Which layers and parameters are offloaded, and which slot each layer uses.

Pure bookkeeping over a ModuleList and the prefetch config: no memory is touched here, so the
plan can be inspected (and tested) before anything moves.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from torch import nn

from .config import PrefetchOffloadConfig, matches_segments


@dataclass(frozen=True)
class OffloadedLayer:
    """One offloaded block: its index in the ModuleList and its place in the prefetch cycle."""

    index: int  # global index in the ModuleList (model.layers.<index>)
    position: int  # k: rank among the offloaded layers
    slot: int  # k % prefetch_step
    params: tuple[str, ...]  # offloaded parameter names, relative to the block


@dataclass(frozen=True)
class OffloadPlan:
    """The offloaded layers of one ModuleList, in execution order."""

    layers_path: str
    num_layers: int
    prefetch_step: int
    layers: tuple[OffloadedLayer, ...]

    @property
    def num_slots(self) -> int:
        return min(self.prefetch_step, len(self.layers))

    def layer_at(self, index: int) -> OffloadedLayer | None:
        """The offloaded layer with ModuleList index ``index``, None if it stays resident."""
        return self._by_index.get(index)

    def next_in_slot(self, layer: OffloadedLayer) -> OffloadedLayer:
        """The layer whose weights go into ``layer``'s slot once ``layer`` is done with it.

        That is the layer ``prefetch_step`` ahead; past the last offloaded layer it wraps to the
        first user of the same slot in the next forward (so the copy engine keeps working across
        forwards). When the number of offloaded layers is a multiple of ``prefetch_step`` this is
        exactly ``(k + step) % n``; otherwise it is the only choice that never overwrites a slot
        before its reader has run.
        """
        ahead = layer.position + self.prefetch_step
        if ahead < len(self.layers):
            return self.layers[ahead]
        return self.layers[layer.slot]

    @cached_property
    def _by_index(self) -> dict[int, OffloadedLayer]:
        return {layer.index: layer for layer in self.layers}


def plan_prefetch(
    layers: nn.ModuleList, layers_path: str, config: PrefetchOffloadConfig
) -> OffloadPlan:
    """Choose the offloaded layers (``i % group >= group - num_in_group``) and their params.

    With ``offload_params`` set, only parameters whose full name matches one of its segment
    patterns are offloaded, and a layer left with none is not offloaded at all.
    """
    chosen: list[OffloadedLayer] = []
    for index in config.offloaded_layers(len(layers)):
        names = tuple(
            name
            for name, _ in layers[index].named_parameters()
            if not config.offload_params
            or matches_segments(f"{layers_path}.{index}.{name}", config.offload_params)
        )
        if not names:
            continue
        position = len(chosen)
        chosen.append(
            OffloadedLayer(index, position, position % config.offload_prefetch_step, names)
        )
    return OffloadPlan(layers_path, len(layers), config.offload_prefetch_step, tuple(chosen))
