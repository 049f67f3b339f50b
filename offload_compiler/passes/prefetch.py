"""The prefetch rewrite: offloaded parameter reads become slot reads fenced by prefetch ops
(``wait_prefetch`` before a unit's first slot reader, ``start_prefetch`` of the slot's next unit
after its last, ``join_after_forward`` before the output). passes/README.md has the invariants.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx
from torch.distributed.tensor import DTensor
from torch.multiprocessing.reductions import StorageWeakRef

from .. import ops
from ..sharding import local
from .anchors import (
    anchor_test,
    computed_tensors,
    ensure_readers_follow,
    live_after,
    live_into,
    reading_slots,
)
from .common import (
    Rewrite,
    UnsupportedGraphError,
    copy_graph_module,
    fake_mode_of,
    mark_static_input,
    storage_of,
)
from .work_estimate import WorkEstimate


@dataclass(frozen=True)
class SlotRead:
    """Redirect one parameter placeholder to a slot buffer of an offloaded layer."""

    runtime_id: int
    layer: int  # ModuleList index of the offloaded layer
    param: str  # the parameter's name in the layer
    prefetch: int  # layer whose copy starts once this layer's span is over
    prefetch_params: tuple[str, ...]  # that layer's offloaded parameters
    slot_name: str  # name of the slot placeholder (shared by the layers of one slot)
    slot: torch.Tensor


@dataclass
class _Span:
    """The nodes of one unit (a layer, or one parameter of it) that read its slots."""

    runtime_id: int
    layer: int
    param: str | None
    first: fx.Node  # the first node that reads the unit's slots
    last: fx.Node  # the last one
    readers: set[fx.Node]  # the computations that read them (views of the slots excluded)
    prefetch: int  # the layer whose copy into this slot starts once the span is over
    next_params: tuple[str, ...]  # that layer's offloaded parameters

    @property
    def key(self) -> tuple[int, int, str | None]:
        return (self.runtime_id, self.layer, self.param)


def insert_prefetch_ops(
    gm: fx.GraphModule, reads: dict[str, SlotRead], *, rejoin: bool, per_param: bool
) -> Rewrite:
    """A rewritten copy of ``gm``, the slot tensors to append to its inputs and the number of
    extra outputs (one token per runtime) to drop. ``reads`` maps parameter placeholders to the
    slots they read instead; ``rejoin``: the graph will run as a CUDA graph, so its copies are
    joined before it returns; ``per_param``: a span, a wait and a start per (layer, parameter).
    AOTAutograd's and Inductor's caches hash the rewritten graph, so they key the rewrite."""
    new_gm = copy_graph_module(gm)
    graph = new_gm.graph
    spans = _find_spans(graph, reads, per_param)
    slots, input_storages = _swap_in_slots(graph, reads)
    tokens = _add_tokens(graph, reads)
    _fence_spans(graph, spans, tokens, rejoin, input_storages)
    _join_before_output(graph, tokens, rejoin)
    _anchor_local_shards(graph)
    graph.lint()
    new_gm.recompile()
    return Rewrite(new_gm, slots, len(tokens))


def _order(graph: fx.Graph) -> dict[fx.Node, int]:
    return {node: i for i, node in enumerate(graph.nodes)}


def _find_spans(graph: fx.Graph, reads: dict[str, SlotRead], per_param: bool) -> list[_Span]:
    """Each unit's span, in graph order, found while every layer has placeholders of its own."""
    placeholders = {n.name: n for n in graph.find_nodes(op="placeholder")}
    params: dict[tuple[int, int, str | None], list[fx.Node]] = {}
    target: dict[tuple[int, int, str | None], SlotRead] = {}
    for name, read in reads.items():
        key = (read.runtime_id, read.layer, read.param if per_param else None)
        params.setdefault(key, []).append(placeholders[name])
        target[key] = read
    order = _order(graph)
    computed = computed_tensors(graph)
    spans = []
    for key, nodes in params.items():
        slot_reads = reading_slots(computed, nodes, {storage_of(p) for p in nodes})
        users = {user for node in slot_reads for user in node.users}
        if any(user.op == "output" for user in users):
            raise UnsupportedGraphError(
                f"the graph returns a parameter of offloaded layer {key[1]} (or a view of "
                "it); offloaded weights are only readable inside the compiled graph"
            )
        first = min(users, key=order.__getitem__)
        last = max(users, key=order.__getitem__)
        read = target[key]
        spans.append(
            _Span(*key, first, last, users - slot_reads, read.prefetch, read.prefetch_params)
        )
    return sorted(spans, key=lambda span: order[span.first])


def _swap_in_slots(
    graph: fx.Graph, reads: dict[str, SlotRead]
) -> tuple[list[torch.Tensor], set[StorageWeakRef]]:
    """Replace the parameter placeholders (which stay, unused) by static slot placeholders after
    them; the slot tensors in placeholder order, and the storages of every graph input."""
    placeholders = {n.name: n for n in graph.find_nodes(op="placeholder")}
    fake_mode = fake_mode_of(placeholders.values())
    input_storages = {storage_of(n) for n in placeholders.values()} - {None}
    slot_nodes: dict[int, fx.Node] = {}  # id of the slot buffer -> its placeholder
    slots: list[torch.Tensor] = []
    last_placeholder = list(placeholders.values())[-1]
    for name, read in reads.items():
        slot_node = slot_nodes.get(id(read.slot))
        if slot_node is None:
            # layers of different shapes share a slot index but not a buffer
            taken = {n.target for n in slot_nodes.values()}
            target, suffix = read.slot_name, 0
            while target in taken:
                suffix += 1
                target = f"{read.slot_name}_{suffix}"
            with graph.inserting_after(last_placeholder):
                slot_node = graph.placeholder(target)
            last_placeholder = slot_node
            mark_static_input(slot_node, read.slot, fake_mode)
            slot_nodes[id(read.slot)] = slot_node
            slots.append(read.slot)
        placeholders[name].replace_all_uses_with(slot_node)
    return slots, input_storages | {storage_of(n) for n in slot_nodes.values()}


def _add_tokens(graph: fx.Graph, reads: dict[str, SlotRead]) -> dict[int, fx.Node]:
    """One token per runtime, after the placeholders: every op of the runtime mutates it."""
    fake_mode = fake_mode_of(graph.find_nodes(op="placeholder"))
    after = graph.find_nodes(op="placeholder")[-1]
    tokens: dict[int, fx.Node] = {}
    for runtime_id in sorted({read.runtime_id for read in reads.values()}):
        device = next(r.slot.device for r in reads.values() if r.runtime_id == runtime_id)
        with graph.inserting_after(after):
            token = graph.call_function(torch.empty, ((0,),), {"device": device})
        with fake_mode:
            token.meta["example_value"] = torch.empty((0,), device=device)
        tokens[runtime_id] = token
        after = token
    return tokens


def _fence_spans(
    graph: fx.Graph,
    spans: list[_Span],
    tokens: dict[int, fx.Node],
    rejoin: bool,
    input_storages: set[StorageWeakRef],
) -> None:
    """``wait_prefetch`` right before each span's first node, ``start_prefetch`` of the next unit
    of its slot right after its last node or at the top of the graph (`_starts_at_top`)."""
    is_anchor = anchor_test(input_storages)
    work = WorkEstimate(graph)
    span_start = {span.key: span.first for span in spans}
    started_after = _units_started_after(spans)
    top_of_graph = dict(tokens)  # runtime -> node after which graph-top starts go
    for span in spans:
        token = tokens[span.runtime_id]
        order = _order(graph)
        nodes = [n for n in graph.nodes if order[span.first] <= order[n] <= order[span.last]]
        live_in = ensure_readers_follow(graph, span, nodes, live_into(nodes, is_anchor))
        with graph.inserting_before(span.first):
            wait = graph.call_function(
                ops.WAIT_PREFETCH,
                ([token, *live_in], span.runtime_id, span.layer, *_unit_arg(span.param)),
            )
        wait.meta["example_value"] = None
        for started in started_after[span.key]:  # units of layer `span.prefetch` to copy now
            args = (span.runtime_id, span.prefetch, *_unit_arg(started))
            order = _order(graph)
            reader = span_start.get((span.runtime_id, span.prefetch, started))
            if rejoin and _starts_at_top(reader, span, order, work):
                with graph.inserting_after(top_of_graph[span.runtime_id]):
                    start = graph.call_function(ops.START_PREFETCH, ([token], *args))
                top_of_graph[span.runtime_id] = start
            else:
                live_out = live_after(graph, span.readers, span.last, order, is_anchor)
                if not live_out:
                    raise UnsupportedGraphError(
                        f"nothing computed from offloaded layer {span.layer}'s weights is used "
                        "after them; there is no activation to order its prefetch after"
                    )
                with graph.inserting_after(span.last):
                    start = graph.call_function(ops.START_PREFETCH, ([token, *live_out], *args))
            start.meta["example_value"] = None


def _starts_at_top(
    reader: fx.Node | None, span: _Span, order: dict[fx.Node, int], work: WorkEstimate
) -> bool:
    """Whether a copy for the next forward starts at the top of the next call rather than after
    ``span``: where less work is left in this graph than comes before its reader in the next
    one. Under CUDA graphs the join waits for it at the end, so at the top it hides behind more
    (its slot's last reader then belongs to the previous call)."""
    return (
        reader is not None
        and order[reader] < order[span.first]
        and work.before(reader) > work.after(span.last)
    )


def _anchor_local_shards(graph: fx.Graph) -> None:
    """The ops anchor a DTensor activation (tensor parallelism) through its local shard
    (``to_local()``, a view of it): the ops then never see a DTensor, which would need a
    sharding strategy and refuses plain tensors (the token) beside it."""
    fake_mode = fake_mode_of(graph.find_nodes(op="placeholder"))
    for op in (ops.WAIT_PREFETCH, ops.START_PREFETCH, ops.JOIN_AFTER_FORWARD):
        for node in graph.find_nodes(op="call_function", target=op):
            anchors = list(node.args[0])
            for i, anchor in enumerate(anchors):
                value = anchor.meta.get("example_value")
                if isinstance(value, DTensor):
                    with graph.inserting_before(node):
                        anchors[i] = graph.call_method("to_local", (anchor,))
                    with fake_mode:
                        anchors[i].meta["example_value"] = local(value)
            node.args = (anchors, *node.args[1:])


def _join_before_output(graph: fx.Graph, tokens: dict[int, fx.Node], rejoin: bool) -> None:
    """``join_after_forward`` per runtime; the tokens become outputs so the joins stay alive."""
    output = next(iter(graph.find_nodes(op="output")))
    for runtime_id, token in tokens.items():
        with graph.inserting_before(output):
            join = graph.call_function(ops.JOIN_AFTER_FORWARD, ([token], runtime_id, rejoin))
        join.meta["example_value"] = None
    (results,) = output.args
    output.args = ((*results, *tokens.values()),)


def _unit_arg(param: str | None) -> tuple[str, ...]:
    """The ops' optional parameter argument: absent for a whole layer."""
    return () if param is None else (param,)


def _units_started_after(spans: list[_Span]) -> dict[tuple[int, int, str | None], list[str | None]]:
    """Which units of the next layer of its slot each span starts when it ends: per layer, the
    whole layer; per parameter, the same parameter if that layer offloads it, and after this
    layer's last span the next layer's parameters that have no span of this layer here (resident
    in this layer, or read in another graph)."""
    if all(span.param is None for span in spans):
        return {span.key: [None] for span in spans}
    own: dict[tuple[int, int], set[str | None]] = {}
    last_span: dict[tuple[int, int], _Span] = {}
    for span in spans:
        layer = span.key[:2]
        own.setdefault(layer, set()).add(span.param)
        if layer not in last_span or span.last > last_span[layer].last:
            last_span[layer] = span
    started: dict[tuple[int, int, str | None], list[str | None]] = {}
    for span in spans:
        wanted = set(span.next_params)
        units: list[str | None] = [span.param] if span.param in wanted else []
        if last_span[span.key[:2]] is span:
            units += sorted(wanted - own[span.key[:2]])
        started[span.key] = units
    return started
