"""Which nodes read a unit's slots, and which activations the prefetch ops may declare mutated
(their anchors): the graph analysis behind `prefetch.insert_prefetch_ops`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import fx
from torch.multiprocessing.reductions import StorageWeakRef

from .common import UnsupportedGraphError, storage_of

if TYPE_CHECKING:
    from .prefetch import _Span


_Computed = tuple[fx.Node, StorageWeakRef | None, list[fx.Node]]


def computed_tensors(graph: fx.Graph) -> list[_Computed]:
    """Every non-placeholder node in graph order, with its value's storage and tensor inputs."""
    computed = []
    for node in graph.nodes:
        if node.op == "placeholder":
            continue
        inputs = [
            i for i in node.all_input_nodes if isinstance(i.meta.get("example_value"), torch.Tensor)
        ]
        computed.append((node, storage_of(node), inputs))
    return computed


def reading_slots(
    computed: list[_Computed], slots: list[fx.Node], storages: set[StorageWeakRef]
) -> set[fx.Node]:
    """Nodes whose values are the layer's slots or computed from them alone (views, a dtype cast
    of a norm weight). The span to fence runs from the first to the last of their users, since
    Inductor may inline a weight-only computation into any of them."""
    reads = set(slots)
    for node, storage, inputs in computed:
        if storage in storages or (inputs and all(i in reads for i in inputs)):
            reads.add(node)
    return reads


def anchor_test(input_storages: set[StorageWeakRef]):
    """Whether a node may be declared mutated: a computed tensor that aliases no graph input."""
    return lambda node: (
        node.op in ("call_function", "call_method", "call_module")
        and (storage := storage_of(node)) is not None
        and storage not in input_storages
    )


def live_into(nodes: list[fx.Node], is_anchor) -> list[fx.Node]:
    """Activations defined before the span ``nodes`` (in graph order) and used inside it."""
    inside = set(nodes)
    live = {i: None for n in nodes for i in n.all_input_nodes if i not in inside and is_anchor(i)}
    return list(live)


def ensure_readers_follow(
    graph: fx.Graph, span: _Span, nodes: list[fx.Node], live_in: list[fx.Node]
) -> list[fx.Node]:
    """Check every slot reader depends on the wait, which it could otherwise precede. One that
    does not reads graph inputs alone (the model input feeding layer 0), which cannot be
    anchors, so the span ``nodes`` reads a fresh clone of them instead, the clone an anchor."""
    if not _unordered_readers(nodes, span.readers, live_in):
        return live_in
    inputs = {inp: None for node in nodes for inp in node.all_input_nodes if _is_user_input(inp)}
    clones = []
    for inp in inputs:
        with graph.inserting_before(span.first):
            clone = graph.call_function(torch.clone, (inp,))
        example = inp.meta["example_value"]
        with example.fake_mode:
            clone.meta["example_value"] = torch.clone(example)
        for node in nodes:
            node.replace_input_with(inp, clone)
        clones.append(clone)
    live_in = [*live_in, *clones]
    unordered = _unordered_readers(nodes, span.readers, live_in)
    if unordered:
        raise UnsupportedGraphError(
            "offloaded weights are used by computations that read no activation "
            f"({', '.join(n.format_node() for n in unordered)}); such work cannot be ordered "
            "after the weights arrive. Keep these parameters resident (offload_params)."
        )
    return live_in


def _is_user_input(node: fx.Node) -> bool:
    """A placeholder Dynamo made for a tensor input that is not a parameter."""
    grapharg = node.meta.get("grapharg")
    example = getattr(grapharg, "example", None)
    return (
        node.op == "placeholder"
        and isinstance(example, torch.Tensor)
        and not isinstance(example, torch.nn.Parameter)
    )


def _unordered_readers(nodes, readers, live_in) -> list[fx.Node]:
    depends = set(live_in)
    for node in nodes:
        if any(inp in depends for inp in node.all_input_nodes):
            depends.add(node)
    return [r for r in readers if r not in depends]


def live_after(graph, readers, last: fx.Node, order, is_anchor) -> list[fx.Node]:
    """Values up to ``last`` computed from the slot readers and still used after ``last``; one
    that is not a tensor (a tuple from split) is replaced by the tensors it was computed from."""
    end = order[last]
    derived = set(readers)
    for node in graph.nodes:
        if order[node] > end:
            break
        if any(inp in derived for inp in node.all_input_nodes):
            derived.add(node)
    live: dict[fx.Node, None] = {}
    pending = [n for n in derived if any(order[u] > end for u in n.users)]
    while pending:
        node = pending.pop()
        if is_anchor(node):
            live[node] = None
        elif not isinstance(node.meta.get("example_value"), torch.Tensor):
            pending.extend(inp for inp in node.all_input_nodes if inp in derived)
    return sorted(live, key=order.__getitem__)
