"""Tensor-parallel parameters (DTensor shards of ``parallelize_module``): each rank offloads and
streams only its own shard.

The rewrite runs on Dynamo's graph, where such a parameter is a DTensor: its slot is a DTensor of
the same mesh and placements around the rank's local slot buffer, the token that chains the ops
is a replicated DTensor, and the ops keep each anchor's placement (a redistribution would anchor
a copy, not the activation). AOTAutograd then unwraps every DTensor, so the compiled graph reads
local slot buffers and the collectives stay where Inductor puts them. Rewriting after that
unwrapping instead would lose ``grapharg``, the map from placeholders to parameters.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.experimental import register_sharding


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's shard of ``tensor`` (itself where it is not a DTensor)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def wrapped_like(param: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
    """``shard`` as the graph reads ``param``: a DTensor of its mesh, placements and global
    shape where ``param`` is one, else ``shard`` itself."""
    if not isinstance(param, DTensor):
        return shard
    return DTensor.from_local(
        shard,
        param.device_mesh,
        param.placements,
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )


def replicated(tensor: torch.Tensor, mesh: DeviceMesh) -> DTensor:
    """``tensor``, the same on every rank, as a DTensor replicated over ``mesh`` (the token)."""
    return DTensor.from_local(tensor, mesh, [Replicate()], run_check=False)


def keep_anchor_placements(*ops: torch._ops.OpOverload) -> None:
    """Register for ``ops`` (anchors first, returning nothing) the one sharding strategy that
    leaves every anchor as it is."""

    def as_is(anchors: list, *_: object) -> list:
        return [([None], [anchor.placements[0] for anchor in anchors])]

    for op in ops:
        register_sharding(op)(as_is)
