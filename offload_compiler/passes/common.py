"""What the passes share: their result, their error, and the graph copy they rewrite."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import fx
from torch.multiprocessing.reductions import StorageWeakRef


class UnsupportedGraphError(RuntimeError):
    """The graph uses offloaded weights in a way the rewrite cannot order safely."""


@dataclass(frozen=True)
class Rewrite:
    """What a pass produced: run ``gm(*inputs, *slots)`` and drop its last ``extra_outputs``."""

    gm: fx.GraphModule
    slots: list[torch.Tensor]
    extra_outputs: int


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of Dynamo's graph module that keeps what AOTAutograd reads off it."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, env))
    new_gm = fx.GraphModule(gm, graph)
    new_gm.meta = dict(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        new_gm._param_name_to_source = gm._param_name_to_source
    for old, new in env.items():
        if old.op == "placeholder":
            new._dynamo_source = getattr(old, "_dynamo_source", None)
    return new_gm


def fake_mode_of(placeholders: Iterable[fx.Node]):
    """The fake mode AOTAutograd will trace in: the tracing context's, as compile_fx finds it."""
    context = torch._guards.TracingContext.try_get()
    if context is not None and context.fake_mode is not None:
        return context.fake_mode
    for node in placeholders:
        value = node.meta.get("example_value")
        if isinstance(value, torch._subclasses.FakeTensor):
            return value.fake_mode
    raise UnsupportedGraphError("the graph's placeholders carry no fake tensors")


def mark_static_input(node: fx.Node, tensor: torch.Tensor, fake_mode) -> None:
    """Meta of a slot placeholder: a static input, like a parameter, for cudagraph trees."""
    node.meta["example_value"] = fake_mode.from_tensor(tensor, static_shapes=True)
    node.meta["val"] = node.meta["example_value"]
    node.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
    node._dynamo_source = None


def storage_of(node: fx.Node) -> StorageWeakRef | None:
    value = node.meta.get("example_value")
    if isinstance(value, torch.Tensor):
        return StorageWeakRef(value.untyped_storage())
    return None
