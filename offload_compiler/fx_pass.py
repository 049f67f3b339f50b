"""The FX rewrites: offloaded parameter reads become slot reads fenced by prefetch ops
(`OffloadPrefetchPass`), or device copies made right before use (`UVAFetchPass`).

Every node this package adds to a graph is added here. For each offloaded layer found in the
graph (in graph order):
  1. its parameter placeholders are replaced by static slot placeholders (appended after the
     existing placeholders; the parameter placeholders stay, unused, because Dynamo still
     passes the parameters);
  2. ``wait_prefetch(layer)`` goes right before the first node that uses any of its slots;
  3. ``start_prefetch(next layer of the slot)`` goes right after the last node that uses them;
and ``join_after_forward`` goes right before the output.

Why the anchors (the tensors each op declares it mutates) are chosen as they are, see ops.py:
wait anchors the activations live into the layer's span, start anchors every value computed
from the layer's slots that is still used after the span. Tensors that alias a graph input are
never anchors (a mutated input is functionalized into a clone and stops cudagraph trees); if a
span's only activations are graph inputs, they are cloned first so the wait has an anchor.

Dynamo's own graph is not modified: it reads ``meta["grapharg"]`` of every placeholder after the
backend returns, so the rewrite works on a copy.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import fx
from torch.multiprocessing.reductions import StorageWeakRef

from . import ops


class UnsupportedGraphError(RuntimeError):
    """The graph uses offloaded weights in a way the rewrite cannot order safely."""


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


@dataclass(frozen=True)
class Rewrite:
    """What a pass produced: run ``gm(*inputs, *slots)`` and drop its last ``extra_outputs``."""

    gm: fx.GraphModule
    slots: list[torch.Tensor]
    extra_outputs: int


class OffloadPrefetchPass:
    """Rewrites a Dynamo graph to read offloaded weights from slots, with prefetch ops.

    It runs before AOTAutograd, so the caches key it by what it produced: AOTAutograd's and
    Inductor's FX graph cache hash the rewritten graph (slot inputs, op arguments and all), and
    a change of configuration that changes the rewrite misses them. (Inductor's
    CustomGraphPass.uuid() is for passes that run inside Inductor, which this one does not.)
    """

    def __init__(self, reads: dict[str, SlotRead], rejoin: bool, per_param: bool = False) -> None:
        self.reads = reads  # parameter placeholder name -> slot read
        self.rejoin = rejoin  # the graph will run as a CUDA graph: join the copies at its end
        self.per_param = per_param  # a span, wait and start per (layer, parameter)

    def __call__(self, gm: fx.GraphModule) -> Rewrite:
        """A rewritten copy of ``gm``, the slot tensors to append to its inputs, and the number
        of extra outputs (one token per runtime) to drop from its results.

        Each slot placeholder's ``meta["example_value"]`` is a fake tensor with static shapes:
        hand those to Inductor as the slots' example inputs, so that a compile with dynamic
        shapes does not give the slots symbolic sizes that no guard source can express.
        """
        new_gm = _copy_graph_module(gm)
        graph = new_gm.graph
        placeholders = {n.name: n for n in graph.find_nodes(op="placeholder")}
        input_storages = {_storage(n) for n in placeholders.values() if _storage(n) is not None}
        fake_mode = _fake_mode(placeholders.values())

        # 1. Each layer's span: from the first to the last user of its parameters (found
        # before the rewrite, while every layer still has placeholders of its own).
        layer_params: dict[tuple[int, int, str | None], list[fx.Node]] = {}
        prefetch_of: dict[tuple[int, int, str | None], int] = {}
        next_params: dict[tuple[int, int, str | None], tuple[str, ...]] = {}
        for name, read in self.reads.items():
            key = (read.runtime_id, read.layer, read.param if self.per_param else None)
            layer_params.setdefault(key, []).append(placeholders[name])
            prefetch_of[key] = read.prefetch
            next_params[key] = read.prefetch_params
        order = {node: i for i, node in enumerate(graph.nodes)}
        computed = _computed_tensors(graph)
        spans = []
        for key, params in layer_params.items():
            reads = _slot_reads(computed, params, {_storage(p) for p in params})
            users = {user for node in reads for user in node.users}
            if any(user.op == "output" for user in users):
                raise UnsupportedGraphError(
                    f"the graph returns a parameter of offloaded layer {key[1]} (or a view of "
                    "it); offloaded weights are only readable inside the compiled graph"
                )
            first = min(users, key=order.__getitem__)
            last = max(users, key=order.__getitem__)
            spans.append((order[first], key, first, last, users - reads))

        # 2. Slot placeholders replace parameter placeholders.
        slot_nodes: dict[int, fx.Node] = {}  # id of the slot buffer -> its placeholder
        extra_inputs: list[torch.Tensor] = []
        last_placeholder = list(placeholders.values())[-1]
        for name, read in self.reads.items():
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
                _mark_static_input(slot_node, read.slot, fake_mode)
                slot_nodes[id(read.slot)] = slot_node
                extra_inputs.append(read.slot)
            placeholders[name].replace_all_uses_with(slot_node)
        input_storages |= {_storage(n) for n in slot_nodes.values()}

        # 3. One token per runtime, created after the placeholders, chains that runtime's ops.
        tokens: dict[int, fx.Node] = {}
        for runtime_id in sorted({key[0] for key in layer_params}):
            device = next(r.slot.device for r in self.reads.values() if r.runtime_id == runtime_id)
            with graph.inserting_after(last_placeholder):
                token = graph.call_function(torch.empty, ((0,),), {"device": device})
            with fake_mode:
                token.meta["example_value"] = torch.empty((0,), device=device)
            tokens[runtime_id] = token
            last_placeholder = token

        # 4. The ops around each span, in graph order.
        order = {node: i for i, node in enumerate(graph.nodes)}
        spans.sort(key=operator.itemgetter(0))

        is_anchor = _anchor_test(input_storages)
        work = _WorkEstimate(graph)
        span_start = {key: first for _, key, first, _, _ in spans}
        started_after = _units_started_after(spans, next_params, order)
        top_of_graph = dict(tokens)  # runtime -> node after which graph-top starts go
        for _, key, first, last, readers in spans:
            runtime_id, layer, param = key
            token = tokens[runtime_id]
            target = prefetch_of[key]
            live_in = _live_in(graph, first, last, order, is_anchor)
            live_in = _ensure_readers_follow(graph, first, last, readers, live_in, order)
            with graph.inserting_before(first):
                wait = graph.call_function(
                    ops.WAIT_PREFETCH,
                    ([token, *live_in], runtime_id, layer, *_unit_arg(param)),
                )
            wait.meta["example_value"] = None
            order = {node: i for i, node in enumerate(graph.nodes)}
            for started in started_after[key]:  # units of layer `target` to copy now
                unit = _unit_arg(started)
                target_first = span_start.get((runtime_id, target, started))
                if (
                    self.rejoin
                    and target_first is not None
                    and order[target_first] < order[first]
                    and work.before(target_first) > work.after(last)
                ):
                    # A copy for the next forward that would start with less work left in
                    # this graph than comes before its reader in the next one: under CUDA
                    # graphs the join would wait for it at the end, so start it at the top of
                    # the next call instead (its slot's last reader then belongs to the
                    # previous call).
                    with graph.inserting_after(top_of_graph[runtime_id]):
                        start = graph.call_function(
                            ops.START_PREFETCH, ([token], runtime_id, target, *unit)
                        )
                    start.meta["example_value"] = None
                    top_of_graph[runtime_id] = start
                    order = {node: i for i, node in enumerate(graph.nodes)}
                    continue
                live_out = _live_out(graph, readers, last, order, is_anchor)
                if not live_out:
                    raise UnsupportedGraphError(
                        f"nothing computed from offloaded layer {layer}'s weights is used "
                        "after them; there is no activation to order its prefetch after"
                    )
                with graph.inserting_after(last):
                    start = graph.call_function(
                        ops.START_PREFETCH, ([token, *live_out], runtime_id, target, *unit)
                    )
                start.meta["example_value"] = None
                order = {node: i for i, node in enumerate(graph.nodes)}

        # 5. join_after_forward, with the tokens returned as extra outputs: a mutation whose
        # result nothing reads is dead code after functionalization, so the join needs a user.
        output = next(iter(graph.find_nodes(op="output")))
        for runtime_id, token in tokens.items():
            with graph.inserting_before(output):
                join = graph.call_function(
                    ops.JOIN_AFTER_FORWARD, ([token], runtime_id, self.rejoin)
                )
            join.meta["example_value"] = None
        (results,) = output.args
        output.args = ((*results, *tokens.values()),)
        graph.lint()
        new_gm.recompile()
        return Rewrite(new_gm, extra_inputs, len(tokens))


@dataclass(frozen=True)
class FetchRead:
    """Redirect one parameter placeholder to device copies made before each use (UVA fallback)."""

    fetcher_id: int
    index: int


class UVAFetchPass:
    """Rewrites a Dynamo graph so UVA-offloaded parameters are copied to the device right
    before each use, for when the device cannot read them in place.

    One ``fetch_param`` per using node, placed right before it, so a copy lives only as long as
    its user needs it. Its read-only ``after`` argument is an activation the user also reads
    (when it has one), so the copy cannot be hoisted above the work that precedes the use.
    """

    def __init__(self, reads: dict[str, FetchRead]) -> None:
        self.reads = reads  # parameter placeholder name -> fetch

    def __call__(self, gm: fx.GraphModule) -> Rewrite:
        new_gm = _copy_graph_module(gm)
        graph = new_gm.graph
        placeholders = {n.name: n for n in graph.find_nodes(op="placeholder")}
        for name, read in self.reads.items():
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
                        if inp.name not in self.reads
                        and inp.target is not ops.FETCH_PARAM
                        and isinstance(inp.meta.get("example_value"), torch.Tensor)
                    ),
                    param_node,
                )
                with graph.inserting_before(user):
                    fetched = graph.call_function(
                        ops.FETCH_PARAM, (after, read.fetcher_id, read.index)
                    )
                fetched.meta["example_value"] = param_node.meta["example_value"]
                user.replace_input_with(param_node, fetched)
        graph.lint()
        new_gm.recompile()
        return Rewrite(new_gm, [], 0)


class _WorkEstimate:
    """Estimated run time of the nodes before or after a node of the graph as it was before
    the rewrite, in bytes of memory traffic: how much compute a copy started there can hide
    behind.

    Counted per node on a roofline (see `_node_cost`), not as a number of nodes: the tail of a
    language model is one or two nodes (norm, lm_head) but as long as two or three decoder
    layers, and a count of nodes once started the copies for the next call at the top of it
    while the copy engine idled through that tail (measured on an H100, issue #7). Prefix sums
    over the original nodes: the nodes the rewrite adds cost nothing, so they change no sum.
    """

    def __init__(self, graph: fx.Graph) -> None:
        self._before: dict[fx.Node, float] = {}
        self._cost: dict[fx.Node, float] = {}
        total = 0.0
        for node in graph.nodes:
            self._before[node] = total
            self._cost[node] = _node_cost(node)
            total += self._cost[node]
        self._total = total

    def before(self, node: fx.Node) -> float:
        """Work of the nodes strictly before ``node``."""
        return self._before[node]

    def after(self, node: fx.Node) -> float:
        """Work of the nodes strictly after ``node``."""
        return self._total - self._before[node] - self._cost[node]


# bf16 dense matmul throughput over memory bandwidth of current GPUs (H100: about 990 TFLOP/s
# and 3.35 TB/s): a node costs max(its FLOPs / this, the bytes it reads and writes).
_FLOPS_PER_BYTE = 300.0
_LINEAR = {torch._C._nn.linear, torch.nn.functional.linear}
_MATMUL = {torch.matmul, operator.matmul, torch.mm, torch.bmm, torch.Tensor.matmul}
_ATTENTION = {torch._C._nn.scaled_dot_product_attention}
_GATHER = {torch.nn.functional.embedding, torch.embedding}


def _node_cost(node: fx.Node) -> float:
    """Roofline estimate of one node: max(FLOPs / _FLOPS_PER_BYTE, bytes read and written),
    from the example values Dynamo recorded (symbolic sizes at their hint)."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return 0.0
    out = node.meta.get("example_value")
    inputs = [a.meta.get("example_value") for a in node.args if isinstance(a, fx.Node)]
    inputs = [t for t in inputs if isinstance(t, torch.Tensor)]
    if not isinstance(out, torch.Tensor):
        return 0.0
    if any(_same_storage(out, t) for t in inputs):
        return 0.0  # a view: no memory traffic of its own
    if node.target in _GATHER:  # reads the rows it returns, not the whole table
        return 2.0 * _numel(out) * out.element_size()
    moved = sum(_numel(t) * t.element_size() for t in [out, *inputs])
    flops = 0.0
    if inputs and inputs[0].dim():
        matmul = node.target in _LINEAR or node.target in _MATMUL
        if matmul or (node.op == "call_method" and node.target in ("matmul", "__matmul__")):
            flops = 2.0 * _numel(out) * _hint(inputs[0].shape[-1])
        elif node.target in _ATTENTION and len(inputs) >= 2:
            flops = 4.0 * _numel(inputs[0]) * _hint(inputs[1].shape[-2])  # QK^T and PV
    return max(flops / _FLOPS_PER_BYTE, float(moved))


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return StorageWeakRef(a.untyped_storage()) == StorageWeakRef(b.untyped_storage())


def _numel(tensor: torch.Tensor) -> int:
    count = 1
    for size in tensor.shape:
        count *= _hint(size)
    return count


def _hint(size: int | torch.SymInt) -> int:
    """A size, or the value a symbolic size was traced with."""
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        return int(hint) if hint is not None else 1
    return int(size)


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of Dynamo's graph module that keeps what AOTAutograd reads off it."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    output = graph.graph_copy(gm.graph, env)
    graph.output(output)
    new_gm = fx.GraphModule(gm, graph)
    new_gm.meta = dict(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        new_gm._param_name_to_source = gm._param_name_to_source
    for old, new in env.items():
        if old.op == "placeholder":
            new._dynamo_source = getattr(old, "_dynamo_source", None)
    return new_gm


def _fake_mode(placeholders: Iterable[fx.Node]):
    """The fake mode AOTAutograd will trace in: the tracing context's, as compile_fx finds it."""
    context = torch._guards.TracingContext.try_get()
    if context is not None and context.fake_mode is not None:
        return context.fake_mode
    for node in placeholders:
        value = node.meta.get("example_value")
        if isinstance(value, torch._subclasses.FakeTensor):
            return value.fake_mode
    raise UnsupportedGraphError("the graph's placeholders carry no fake tensors")


def _mark_static_input(node: fx.Node, tensor: torch.Tensor, fake_mode) -> None:
    """Meta of a slot placeholder: a static input, like a parameter, for cudagraph trees."""
    node.meta["example_value"] = fake_mode.from_tensor(tensor, static_shapes=True)
    node.meta["val"] = node.meta["example_value"]
    node.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
    node._dynamo_source = None


def _storage(node: fx.Node) -> StorageWeakRef | None:
    value = node.meta.get("example_value")
    if isinstance(value, torch.Tensor):
        return StorageWeakRef(value.untyped_storage())
    return None


_Computed = tuple[fx.Node, StorageWeakRef | None, list[fx.Node]]


def _computed_tensors(graph: fx.Graph) -> list[_Computed]:
    """Every node but the placeholders, in graph order, with the storage of its value and its
    tensor inputs: what `_slot_reads` looks at, worked out once per graph rather than once per
    layer and parameter."""
    computed = []
    for node in graph.nodes:
        if node.op == "placeholder":
            continue
        inputs = [
            i for i in node.all_input_nodes if isinstance(i.meta.get("example_value"), torch.Tensor)
        ]
        computed.append((node, _storage(node), inputs))
    return computed


def _slot_reads(
    computed: list[_Computed], slots: list[fx.Node], storages: set[StorageWeakRef]
) -> set[fx.Node]:
    """Nodes whose values are the layer's slots or computed from them alone.

    That is the slot placeholders, their views, and weight-only computations (a dtype cast of a
    norm weight, say). Their users are the layer's readers; the span to fence runs from the
    first to the last of those users, since Inductor may inline a weight-only computation into
    any of them.
    """
    reads = set(slots)
    for node, storage, inputs in computed:
        if storage in storages or (inputs and all(i in reads for i in inputs)):
            reads.add(node)
    return reads


def _anchor_test(input_storages: set[StorageWeakRef]):
    """Whether a node may be declared mutated: a computed tensor that aliases no graph input."""

    def is_anchor(node: fx.Node) -> bool:
        storage = _storage(node)
        return (
            node.op in ("call_function", "call_method", "call_module")
            and storage is not None
            and storage not in input_storages
        )

    return is_anchor


def _live_in(graph, first: fx.Node, last: fx.Node, order, is_anchor) -> list[fx.Node]:
    """Activations defined before ``first`` and used inside the span ``first..last``."""
    start, end = order[first], order[last]
    live = {}
    for node in graph.nodes:
        if start <= order[node] <= end:
            for inp in node.all_input_nodes:
                if order[inp] < start and is_anchor(inp):
                    live[inp] = None
    return list(live)


def _ensure_readers_follow(
    graph: fx.Graph,
    first: fx.Node,
    last: fx.Node,
    readers: set[fx.Node],
    live_in: list[fx.Node],
    order: dict[fx.Node, int],
) -> list[fx.Node]:
    """Check every slot reader depends on the wait; clone graph inputs to anchor it if not.

    A reader that depends on none of the wait's anchors could be scheduled before the wait.
    Such a reader's activations come straight from graph inputs (e.g. the model input feeding
    layer 0); an input cannot be an anchor, so the span reads a fresh clone of it instead.
    """
    if not _unordered_readers(graph, first, last, readers, live_in, order):
        return live_in
    span = [n for n in graph.nodes if order[first] <= order[n] <= order[last]]
    inputs = {inp: None for node in span for inp in node.all_input_nodes if _is_user_input(inp)}
    clones = []
    for inp in inputs:
        with graph.inserting_before(first):
            clone = graph.call_function(torch.clone, (inp,))
        example = inp.meta["example_value"]
        with example.fake_mode:
            clone.meta["example_value"] = torch.clone(example)
        for node in span:
            node.replace_input_with(inp, clone)
        clones.append(clone)
    live_in = [*live_in, *clones]
    order.update({node: i for i, node in enumerate(graph.nodes)})
    unordered = _unordered_readers(graph, first, last, readers, live_in, order)
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


def _unordered_readers(graph, first, last, readers, live_in, order) -> list[fx.Node]:
    depends = set(live_in)
    for node in graph.nodes:
        if order[first] <= order[node] <= order[last] and any(
            inp in depends for inp in node.all_input_nodes
        ):
            depends.add(node)
    return [r for r in readers if r not in depends]


def _live_out(graph, readers, last: fx.Node, order, is_anchor) -> list[fx.Node]:
    """Values up to ``last`` computed from the slot readers and still used after ``last``.

    A value that is not a tensor (a tuple from split, say) is replaced by the tensors it was
    computed from, since that is what its later users' views are rebuilt from.
    """
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


def _unit_arg(param: str | None) -> tuple[str, ...]:
    """The ops' optional parameter argument: absent for a whole layer."""
    return () if param is None else (param,)


def _units_started_after(
    spans: list,
    next_params: dict[tuple[int, int, str | None], tuple[str, ...]],
    order: dict[fx.Node, int],
) -> dict[tuple[int, int, str | None], list[str | None]]:
    """Which units of the next layer of its slot each span starts when it ends.

    Per layer: the whole next layer. Per parameter: the same parameter of the next layer, if
    that layer offloads it; the next layer's parameters that have no span of this layer here
    (left resident in this layer, being tied or shared, or read in another graph) start after
    this layer's last span, as a whole layer would.
    """
    if all(key[2] is None for _, key, *_ in spans):
        return {key: [None] for _, key, *_ in spans}
    own: dict[tuple[int, int], set[str | None]] = {}
    last_span: dict[tuple[int, int], tuple[tuple[int, int, str | None], fx.Node]] = {}
    for _, key, _, last, _ in spans:
        layer = key[:2]
        own.setdefault(layer, set()).add(key[2])
        if layer not in last_span or order[last] > order[last_span[layer][1]]:
            last_span[layer] = (key, last)
    started: dict[tuple[int, int, str | None], list[str | None]] = {}
    for _, key, *_ in spans:
        wanted = set(next_params[key])
        units: list[str | None] = [key[2]] if key[2] in wanted else []
        if last_span[key[:2]][0] == key:
            units += sorted(wanted - own[key[:2]])
        started[key] = units
    return started
