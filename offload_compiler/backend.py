"""The ``offload`` torch.compile backend: options -> schedule -> binding -> rewrite -> Inductor.

`rewrite_graph` is everything up to Inductor (what tests call to see the rewritten graph),
`compile_graph` the Inductor compile and the callable around it.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch._inductor.compile_fx import compile_fx
from torch._logging import trace_structured
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .binding import bind_slot_reads, bind_uva_reads, graph_device
from .config import OffloadConfig
from .discovery import candidate_roots
from .passes import insert_fetches, insert_prefetch_ops
from .planner import resolve_budget
from .runtime.counter_order import GraphProgram
from .runtime.prefetcher import OffloadRuntime
from .runtime.staging import stage_inputs
from .schedule import Schedule, resolve

log = logging.getLogger(__name__)

# Inductor must keep the inserted order: reorder_for_locality hoists every prefetch op to the
# top (no overlap) and peak-memory reordering may move a weight-only kernel ahead of its wait.
_ORDER_PRESERVING = {"reorder_for_locality": False, "reorder_for_peak_memory": False}

_REPLAYS_SEE_NO_CHANGES = (
    "offload: replays of a CUDA graph captured by hand run no Python, so they do not notice "
    "changed weights: after changing offloaded weights, call "
    "offload_compiler.reload_weights(model) before the next replay"
)


@dataclass(frozen=True)
class OffloadGraph:
    """Dynamo's graph as the backend will compile it."""

    gm: fx.GraphModule
    """The graph to compile: rewritten where it reads offloaded weights, else Dynamo's own."""
    schedule: Schedule
    rewritten: bool = False
    slots: tuple[torch.Tensor, ...] = ()
    """Static slot buffers, appended to the inputs of every call."""
    extra_outputs: int = 0
    """Token outputs the rewrite added, dropped from the results."""
    runtimes: tuple[OffloadRuntime, ...] = ()


def offload_backend(
    gm: fx.GraphModule,
    example_inputs: list[torch.Tensor],
    *,
    mode: str | None = None,
    options: OffloadConfig | Mapping[str, Any] | None = None,
) -> Callable[..., Any]:
    """Compile ``gm`` with its offloaded weights read from prefetched slots or host memory."""
    return compile_graph(rewrite_graph(gm, example_inputs, options, mode), example_inputs)


def rewrite_graph(
    gm: fx.GraphModule,
    example_inputs: list[torch.Tensor],
    options: OffloadConfig | Mapping[str, Any] | None,
    mode: str | None = None,
) -> OffloadGraph:
    """Resolve the options, bind the graph's offloaded parameters and rewrite a copy of ``gm``."""
    config = OffloadConfig.from_options(options)
    device = graph_device(gm, example_inputs)
    if config.gpu_memory_budget is not None:
        config = resolve_budget(config, _planned_root(gm), device)
    schedule = resolve(config, mode, device)
    if schedule.backend is None:
        return OffloadGraph(gm, schedule)
    with unset_fake_temporarily():
        if schedule.backend == "uva":
            fetches, reads, runtimes = bind_uva_reads(gm, config, schedule), {}, []
        else:
            fetches, (reads, runtimes) = {}, bind_slot_reads(gm, config, schedule)
    if not reads and not fetches:
        if schedule.backend == "prefetch":
            log.info("offload: this graph reads no offloaded layer; compiling it unchanged")
        return OffloadGraph(gm, schedule)
    _guard_parameter_identity(gm, {*reads, *fetches})
    if fetches:
        rewrite = insert_fetches(gm, fetches)
    else:
        rewrite = insert_prefetch_ops(
            gm, reads, rejoin=schedule.rejoin, per_param=schedule.per_param
        )
        _log_summary(runtimes, len({(r.runtime_id, r.layer) for r in reads.values()}))
    _publish_graph(rewrite.gm)
    return OffloadGraph(
        rewrite.gm, schedule, True, tuple(rewrite.slots), rewrite.extra_outputs, tuple(runtimes)
    )


def compile_graph(graph: OffloadGraph, example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
    """Inductor-compile ``graph`` into a callable of Dynamo's inputs: it appends the slots,
    drops the token outputs, `refresh`es every runtime before each call and, under CUDA graphs,
    stages the inputs and runs each call inside its runtimes' ``calling`` (host-issued copies)."""
    schedule = graph.schedule
    if not graph.rewritten:
        return compile_fx(graph.gm, example_inputs, config_patches=dict(schedule.inductor_patches))
    slot_examples = [
        node.meta["example_value"]
        for node in graph.gm.graph.find_nodes(op="placeholder")[len(example_inputs) :]
    ]
    staging = stage_inputs(graph.gm, example_inputs) if schedule.staged_inputs else None
    # Dynamo's own example inputs even where staged: a staged buffer would get fresh symbolic
    # sizes without a source (not in AOTAutograd's memo), which breaks Dynamo's shape guards
    compiled = compile_fx(
        graph.gm,
        [*example_inputs, *slot_examples],
        config_patches={**schedule.inductor_patches, **_ORDER_PRESERVING},
    )
    slots, extra, runtimes = graph.slots, graph.extra_outputs, graph.runtimes
    programs = [(r, GraphProgram()) for r in runtimes] if schedule.host_issued_copies else []
    # offload_capturable (the only schedule that rejoins without cudagraph trees): a CUDA graph
    # captured outside Inductor is replayed without `run`, so no refresh runs at its replays
    captured_by_hand = (
        schedule.rejoin and not schedule.cudagraphs and schedule.device.type == "cuda"
    )

    invoke = compiled if staging is None else lambda *a: staging.call(compiled, a)

    def run(*args: Any) -> Any:
        for runtime in runtimes:
            runtime.refresh()
        if captured_by_hand and torch.cuda.is_current_stream_capturing():
            warnings.warn(_REPLAYS_SEE_NO_CHANGES, stacklevel=2)
        with contextlib.ExitStack() as calls:
            for runtime, program in programs:
                calls.enter_context(runtime.calling(program))
            outputs = invoke(*args, *slots)
        return outputs[:-extra] if extra else outputs

    return run


def _planned_root(gm: fx.GraphModule) -> nn.Module:
    """The model a ``gpu_memory_budget`` is planned for: the module whose forward is compiled."""
    with unset_fake_temporarily():
        roots = candidate_roots(gm)
    if not roots:
        raise ValueError(
            "gpu_memory_budget: the compiled function is not a module's forward, so there is no "
            "model to plan for; plan it with offload_compiler.plan and pass plan.config"
        )
    return roots[0]


def _guard_parameter_identity(gm: fx.GraphModule, names: Collection[str]) -> None:
    """Make Dynamo recompile when the graph is called with other parameters in their place: the
    rewrite bakes in their layer and slot, and without module identity guards (inlined nn
    modules) a graph break in the loop over the layers reuses one layer's graph for the rest."""
    from torch._dynamo.guards import GuardBuilder

    guards = torch._guards.TracingContext.get().guards_context.dynamo_guards
    for node in gm.graph.find_nodes(op="placeholder"):
        if node.name in names:
            guards.add(node.meta["grapharg"].source.make_guard(GuardBuilder.ID_MATCH))


def _publish_graph(gm: fx.GraphModule) -> None:
    """The rewritten graph as a DEBUG log line and a tlparse artifact (built only when asked)."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug("offload: rewritten graph\n%s", gm.print_readable(print_output=False))
    trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": "offload_rewritten_graph", "encoding": "string"},
        payload_fn=lambda: gm.print_readable(print_output=False),
    )


def _log_summary(runtimes: Sequence[OffloadRuntime], layers_here: int) -> None:
    """The compile's one INFO line per offloaded stack."""
    for runtime in runtimes:
        plan = runtime.plan
        log.info(
            "offload: %s: %d of %d layers offloaded (%s), %.1f MiB in %s host memory, "
            "%d slots (%.1f MiB on %s), prefetch_step %d; this graph reads %d of them",
            plan.layers_path,
            len(plan.layers),
            plan.num_layers,
            ",".join(str(layer.index) for layer in plan.layers),
            runtime.host_bytes / 2**20,
            "pinned" if runtime.device.type == "cuda" else "CPU",
            plan.num_slots,
            runtime.pool.nbytes / 2**20,
            runtime.device,
            plan.prefetch_step,
            layers_here,
        )
