"""The UVA fallback's rewrite: offloaded parameters copied to the device right before each use,
for when the device cannot read them in place."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from .. import ops
from .common import Rewrite, UnsupportedGraphError, copy_graph_module


@dataclass(frozen=True)
class FetchRead:
    """Redirect one parameter placeholder to device copies made before each use."""

    fetcher_id: int
    index: int


def insert_fetches(gm: fx.GraphModule, reads: dict[str, FetchRead]) -> Rewrite:
    """A copy of ``gm`` in which each parameter placeholder of ``reads`` is copied to the device
    by a ``fetch_param`` right before each user, so a copy lives only as long as its user needs
    it; its ``after`` is an activation the user also reads (when it has one), so it cannot be
    hoisted above the work that precedes the use."""
    new_gm = copy_graph_module(gm)
    graph = new_gm.graph
    placeholders = {n.name: n for n in graph.find_nodes(op="placeholder")}
    for name, read in reads.items():
        param_node = placeholders[name]
        for user in list(param_node.users):
            if user.op == "output":
                raise UnsupportedGraphError(
                    f"the graph returns the offloaded parameter {name}; offloaded weights "
                    "are only readable inside the compiled graph"
                )
            after = next(
                (
                    inp
                    for inp in user.all_input_nodes
                    if inp.name not in reads
                    and inp.target is not ops.FETCH_PARAM
                    and isinstance(inp.meta.get("example_value"), torch.Tensor)
                ),
                param_node,
            )
            with graph.inserting_before(user):
                fetched = graph.call_function(ops.FETCH_PARAM, (after, read.fetcher_id, read.index))
            fetched.meta["example_value"] = param_node.meta["example_value"]
            user.replace_input_with(param_node, fetched)
    graph.lint()
    new_gm.recompile()
    return Rewrite(new_gm, [], 0)
