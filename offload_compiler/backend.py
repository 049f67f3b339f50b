"""The ``offload`` torch.compile backend: config -> plan -> runtime -> FX rewrite -> Inductor.

``torch.compile(model, backend="offload", options={...})`` calls `offload_backend` with Dynamo's
graph. Options are an `OffloadConfig` or a dict of its fields; the Inductor mode travels inside
them (torch.compile refuses ``mode=`` together with ``options=``) and is mapped the way Inductor's
own wrapper maps it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import fx
from torch._inductor import list_mode_options
from torch._inductor.compile_fx import compile_fx
from torch._logging import trace_structured
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .config import OffloadConfig
from .discovery import (
    LayerDiscoveryError,
    candidate_roots,
    known_layer_lists,
    layer_list_of,
    param_placeholders,
)
from .fx_pass import OffloadPrefetchPass, Rewrite, SlotRead
from .planning import plan_prefetch, shared_parameters
from .runtime import OffloadRuntime, runtime_for

log = logging.getLogger(__name__)

# Inductor must keep the inserted order: reorder_for_locality hoists every prefetch op to the
# top of the graph (no overlap at all) and peak-memory reordering may move a weight-only kernel
# ahead of the wait for its weights.
_ORDER_PRESERVING = {"reorder_for_locality": False, "reorder_for_peak_memory": False}


def offload_backend(
    gm: fx.GraphModule,
    example_inputs: list[torch.Tensor],
    *,
    mode: str | None = None,
    options: OffloadConfig | Mapping[str, Any] | None = None,
) -> Callable[..., Any]:
    """Compile ``gm`` with offloaded layers read from prefetched slot buffers."""
    config = OffloadConfig.from_options(options)
    patches = dict(list_mode_options(config.mode or mode or "default"))
    if config.selected_backend is None:
        return compile_fx(gm, example_inputs, config_patches=patches)
    if config.selected_backend == "uva":
        raise NotImplementedError(
            "offload_backend='uva' is not implemented yet; use the prefetch backend "
            "(prefetch.offload_group_size > 0)"
        )
    with unset_fake_temporarily():
        reads, runtimes = plan_slot_reads(gm, config)
    if not reads:
        log.info("offload: this graph reads no offloaded layer; compiling it unchanged")
        return compile_fx(gm, example_inputs, config_patches=patches)
    _guard_parameter_identity(gm, reads)
    cudagraphs = patches.get("triton.cudagraphs", torch._inductor.config.triton.cudagraphs)
    rewrite = OffloadPrefetchPass(reads, rejoin=bool(cudagraphs))
    result = rewrite(gm)
    _log_summary(runtimes, reads)
    _publish_graph(result.gm)
    return compile_rewrite(result, example_inputs, patches)


def compile_rewrite(
    result: Rewrite, example_inputs: list[torch.Tensor], patches: Mapping[str, Any]
) -> Callable[..., Any]:
    """Inductor-compile a rewritten graph; the callable takes Dynamo's inputs.

    It appends the slot buffers to the inputs and drops the token outputs from the results.
    """
    placeholders = result.gm.graph.find_nodes(op="placeholder")
    slot_examples = [n.meta["example_value"] for n in placeholders[len(example_inputs) :]]
    compiled = compile_fx(
        result.gm,
        [*example_inputs, *slot_examples],
        config_patches={**patches, **_ORDER_PRESERVING},
    )
    slots, extra = result.slots, result.extra_outputs

    def run(*args: Any) -> Any:
        return compiled(*args, *slots)[:-extra]

    return run


def plan_slot_reads(
    gm: fx.GraphModule, config: OffloadConfig
) -> tuple[dict[str, SlotRead], list[OffloadRuntime]]:
    """Which placeholders read offloaded parameters, and the slot each should read instead.

    Creates (or reuses) the runtime of every offloaded ModuleList the graph touches, which moves
    those weights to host memory the first time. Must run inside a Dynamo backend call.
    """
    placeholders = {id(p.param): p for p in param_placeholders(gm)}
    layer_lists = known_layer_lists([p.param for p in placeholders.values()])
    roots = candidate_roots(gm) if not layer_lists else []
    errors = []
    for root in roots:
        try:
            layer_lists.append(layer_list_of(root, config.layers_path))
        except LayerDiscoveryError as err:
            errors.append(err)
    if roots and not layer_lists:
        raise errors[0]
    reads: dict[str, SlotRead] = {}
    runtimes = []
    for found in layer_lists:
        path, layers = found.path, found.layers
        shared = shared_parameters(layers, found.root)
        plan = plan_prefetch(layers, path, config.prefetch, shared)
        if not plan.layers:
            log.warning("offload: the config selects no layer of %s to offload", path)
            continue
        in_graph = [
            (layer, name, placeholders[id(param)])
            for layer in plan.layers
            for name, param in layers[layer.index].named_parameters()
            if name in layer.params and id(param) in placeholders
        ]
        if not in_graph:
            continue
        params = [placeholder.param for *_, placeholder in in_graph]
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            raise RuntimeError(
                "the offload backend compiles inference only: call the compiled model under "
                "torch.no_grad() or torch.inference_mode()"
            )
        runtime = runtime_for(
            layers, plan, _compute_device(params), config.compute_hash(), config.poison_slots
        )
        runtimes.append(runtime)
        for layer, name, placeholder in in_graph:
            reads[placeholder.node.name] = SlotRead(
                runtime_id=runtime.id,
                layer=layer.index,
                prefetch=plan.next_in_slot(layer).index,
                slot_name=f"offload_slot_r{runtime.id}_s{layer.slot}_{_identifier(name)}",
                slot=runtime.slot_tensors(layer.index)[name],
            )
    return reads, runtimes


def _guard_parameter_identity(gm: fx.GraphModule, reads: Mapping[str, SlotRead]) -> None:
    """Make Dynamo recompile when the graph is called with other parameters in their place.

    Dynamo does not guard on module identity (inline_inbuilt_nn_modules), so the graph of one
    layer's forward is reused for every layer of the same class when a graph break inside the
    loop over the layers makes it compile layers on their own. The rewrite bakes in which layer
    (and slot) the parameters are, so it must only run for those very parameters.
    """
    from torch._dynamo.guards import GuardBuilder

    guards = torch._guards.TracingContext.get().guards_context.dynamo_guards
    for node in gm.graph.find_nodes(op="placeholder"):
        if node.name in reads:
            guards.add(node.meta["grapharg"].source.make_guard(GuardBuilder.ID_MATCH))


def _publish_graph(gm: fx.GraphModule) -> None:
    """The rewritten graph: a DEBUG log line, and a tlparse artifact under TORCH_TRACE (both
    built only when asked for: printing a large graph takes a while)."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug("offload: rewritten graph\n%s", gm.print_readable(print_output=False))
    trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": "offload_rewritten_graph", "encoding": "string"},
        payload_fn=lambda: gm.print_readable(print_output=False),
    )


def _compute_device(params: list[torch.Tensor]) -> torch.device:
    devices = {p.device for p in params}
    if len(devices) != 1:
        raise ValueError(
            f"the layers' parameters are on several devices ({sorted(map(str, devices))}); "
            "place the model on one device first (offload_compiler.place_model)"
        )
    return devices.pop()


def _identifier(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def _log_summary(runtimes: list[OffloadRuntime], reads: Mapping[str, SlotRead]) -> None:
    layers_here = len({(r.runtime_id, r.layer) for r in reads.values()})
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
