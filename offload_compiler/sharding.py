"""Tensor-parallel parameters (DTensor shards of ``parallelize_module``): each rank offloads and
streams only its own shard.

The rewrite runs on Dynamo's graph, where such a parameter is a DTensor: its slot is a DTensor of
the same mesh and placements around the rank's local slot buffer, and the ops anchor DTensor
activations through their local shards. AOTAutograd then unwraps every DTensor, so the compiled
graph reads local slot buffers and the collectives stay where Inductor puts them. Rewriting after
that unwrapping instead would lose ``grapharg``, the map from placeholders to parameters.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


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
