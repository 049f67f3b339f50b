"""The ``offload`` torch.compile backend: config -> plan -> runtime -> FX rewrite -> Inductor.

``torch.compile(model, backend="offload", options={...})`` calls `offload_backend` with Dynamo's
graph. Options are an `OffloadConfig` or a dict of its fields; the Inductor mode travels inside
them (torch.compile refuses ``mode=`` together with ``options=``) and is mapped the way Inductor's
own wrapper maps it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
from torch import fx
from torch._inductor import list_mode_options
from torch._inductor.compile_fx import compile_fx
from torch._logging import trace_structured
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .config import OffloadConfig
from .counters import GraphProgram
from .discovery import (
    LayerDiscoveryError,
    candidate_roots,
    known_layer_lists,
    layer_list_of,
    param_placeholders,
)
from .fx_pass import FetchRead, OffloadPrefetchPass, Rewrite, SlotRead, UVAFetchPass
from .planning import plan_prefetch, plan_uva, shared_parameters
from .pool import offload_parameters
from .runtime import OffloadRuntime, fetcher_for, runtime_for
from .staging import stage_inputs

log = logging.getLogger(__name__)

# Inductor must keep the inserted order: reorder_for_locality hoists every prefetch op to the
# top of the graph (no overlap at all) and peak-memory reordering may move a weight-only kernel
# ahead of the wait for its weights.
_ORDER_PRESERVING = {"reorder_for_locality": False, "reorder_for_peak_memory": False}

_REPLAYS_SEE_NO_CHANGES = (
    "offload: replays of a CUDA graph captured by hand run no Python, so they do not notice "
    "changed weights: after changing offloaded weights, call "
    "offload_compiler.reload_weights(model) before the next replay"
)
_INFERENCE_ONLY = (
    "the offload backend compiles inference only: call the compiled model under "
    "torch.no_grad() or torch.inference_mode()"
)


def offload_backend(
    gm: fx.GraphModule,
    example_inputs: list[torch.Tensor],
    *,
    mode: str | None = None,
    options: OffloadConfig | Mapping[str, Any] | None = None,
) -> Callable[..., Any]:
    """Compile ``gm`` with its offloaded weights read from prefetched slot buffers (prefetch),
    or from pinned host memory in place or through copies made before use (UVA)."""
    config = OffloadConfig.from_options(options)
    patches = dict(list_mode_options(config.mode or mode or "default"))
    if config.selected_backend is None:
        return compile_fx(gm, example_inputs, config_patches=patches)
    if config.selected_backend == "uva":
        with unset_fake_temporarily():
            fetches = plan_uva_reads(gm, config)
        if not fetches:  # read in place through device views: the graph stays as it is
            _publish_graph(gm)
            return compile_fx(gm, example_inputs, config_patches=patches)
        _guard_parameter_identity(gm, fetches.keys())
        result = UVAFetchPass(fetches)(gm)
        _publish_graph(result.gm)
        return compile_rewrite(result, example_inputs, patches)
    with unset_fake_temporarily():
        reads, runtimes = plan_slot_reads(gm, config)
    if not reads:
        log.info("offload: this graph reads no offloaded layer; compiling it unchanged")
        return compile_fx(gm, example_inputs, config_patches=patches)
    _guard_parameter_identity(gm, reads.keys())
    cudagraphs = bool(patches.get("triton.cudagraphs", torch._inductor.config.triton.cudagraphs))
    counted = [runtime for runtime in runtimes if runtime.host_copies] if cudagraphs else []
    # with host copies a CUDA graph holds no copy, so nothing needs joining at its end
    rejoin = (cudagraphs and not counted) or config.prefetch.offload_capturable
    rewrite = OffloadPrefetchPass(reads, rejoin, per_param=config.prefetch.offload_per_param)
    result = rewrite(gm)
    _log_summary(runtimes, reads)
    _publish_graph(result.gm)
    if counted:
        # one CUDA graph per compiled graph: a call is then a warm-up, a recording or a replay,
        # never a replay followed by another piece's recording (which synchronizes the device
        # before the replay's copies are issued)
        patches["graph_partition"] = False
    return compile_rewrite(result, example_inputs, patches, runtimes, counted)


def compile_rewrite(
    result: Rewrite,
    example_inputs: list[torch.Tensor],
    patches: Mapping[str, Any],
    runtimes: Sequence[OffloadRuntime] = (),
    counted: Sequence[OffloadRuntime] = (),
) -> Callable[..., Any]:
    """Inductor-compile a rewritten graph; the callable takes Dynamo's inputs.

    It appends the slot buffers to the inputs and drops the token outputs from the results.
    Before each call every runtime in ``runtimes`` takes weights changed since the last call.
    Under CUDA graphs, the inputs cudagraph trees would copy are staged so that the graphs
    launch on a stream of their own (`staging`), and each call runs inside the ``calling``
    of every runtime in ``counted`` (host copies: `counters`).
    """
    placeholders = result.gm.graph.find_nodes(op="placeholder")
    slot_examples = [n.meta["example_value"] for n in placeholders[len(example_inputs) :]]
    cudagraphs = patches.get("triton.cudagraphs", torch._inductor.config.triton.cudagraphs)
    staging = stage_inputs(result.gm, example_inputs) if cudagraphs else None
    # Dynamo's own example inputs even where staged: AOTAutograd finds their fake tensors in
    # its memo; a staged buffer would get fresh symbolic sizes without a source, which breaks
    # Dynamo's shape guards (a graph-break model failed so in session 8)
    compiled = compile_fx(
        result.gm,
        [*example_inputs, *slot_examples],
        config_patches={**patches, **_ORDER_PRESERVING},
    )
    slots, extra = result.slots, result.extra_outputs
    programs = [(runtime, GraphProgram()) for runtime in counted]
    # a CUDA graph captured outside Inductor is replayed without `run`: no refresh can run
    captured_by_hand = not cudagraphs and any(r.device.type == "cuda" for r in runtimes)

    def call(args: tuple[Any, ...]) -> Any:
        if staging is None:
            return compiled(*args, *slots)
        return staging.call(compiled, [*args, *slots])

    def run(*args: Any) -> Any:
        for runtime in runtimes:
            runtime.refresh()
        if captured_by_hand and torch.cuda.is_current_stream_capturing():
            warnings.warn(_REPLAYS_SEE_NO_CHANGES, stacklevel=2)
        if programs:
            with contextlib.ExitStack() as calls:
                for runtime, program in programs:
                    calls.enter_context(runtime.calling(program))
                outputs = call(args)
        else:
            outputs = call(args)
        return outputs[:-extra] if extra else outputs

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
            raise RuntimeError(_INFERENCE_ONLY)
        runtime = runtime_for(
            layers,
            plan,
            _compute_device(params),
            config.compute_hash(),
            config.poison_slots,
            host_copies=config.prefetch.offload_host_copies
            and not config.prefetch.offload_capturable,
        )
        runtimes.append(runtime)
        for layer, name, placeholder in in_graph:
            target = plan.next_in_slot(layer)
            reads[placeholder.node.name] = SlotRead(
                runtime_id=runtime.id,
                layer=layer.index,
                param=name,
                prefetch=target.index,
                prefetch_params=target.params,
                slot_name=f"offload_slot_r{runtime.id}_s{layer.slot}_{_identifier(name)}",
                slot=runtime.slot_tensors(layer.index)[name],
            )
    return reads, runtimes


def unified_addressing_disabled() -> bool:
    """The environment's say (``OFFLOAD_COMPILER_DISABLE_UVA=1``), as vLLM's
    ``VLLM_WEIGHT_OFFLOADING_DISABLE_UVA``."""
    return os.environ.get("OFFLOAD_COMPILER_DISABLE_UVA", "0") not in ("", "0")


def plan_uva_reads(gm: fx.GraphModule, config: OffloadConfig) -> dict[str, FetchRead]:
    """Offload the UVA plan's parameters to pinned host memory; say which placeholders must
    be copied to the device before use (none when the device reads host memory in place).

    On CUDA each offloaded parameter becomes a device view of its pinned copy, which compiled
    graphs read in place (zero copy) unless unified addressing is disabled, by the option
    ``uva.use_unified_addressing`` or the environment. On a CPU-only machine there is no
    device view and the graph gets the explicit copies.
    """
    if config.uva.cpu_offload_gb == 0:
        log.warning("offload (uva): uva.cpu_offload_gb is 0, so nothing is offloaded")
    placeholders = {id(p.param): p for p in param_placeholders(gm)}
    reads: dict[str, FetchRead] = {}
    for root in candidate_roots(gm):
        plan = plan_uva(root, config.uva)
        params = dict(root.named_parameters())
        chosen = [params[name] for name in plan.params]
        if not chosen:
            continue
        if torch.is_grad_enabled() and any(p.requires_grad for p in chosen):
            raise RuntimeError(_INFERENCE_ONLY)
        device = _compute_device(chosen)
        hosts = offload_parameters(chosen, device)
        in_place = (
            device.type == "cuda"
            and config.uva.use_unified_addressing
            and not unified_addressing_disabled()
        )
        log.info(
            "offload (uva): %s: %d parameters, %.1f MiB in %s host memory, %s",
            type(root).__name__,
            len(chosen),
            plan.nbytes / 2**20,
            "pinned" if device.type == "cuda" else "CPU",
            "read in place by the device" if in_place else "copied to the device before use",
        )
        if in_place:
            continue
        fetcher = fetcher_for(root, hosts, device)
        for index, param in enumerate(chosen):
            placeholder = placeholders.get(id(param))
            if placeholder is not None:
                reads[placeholder.node.name] = FetchRead(fetcher.id, index)
    return reads


def _guard_parameter_identity(gm: fx.GraphModule, names: Collection[str]) -> None:
    """Make Dynamo recompile when the graph is called with other parameters in their place.

    Dynamo does not guard on module identity (inline_inbuilt_nn_modules), so the graph of one
    layer's forward is reused for every layer of the same class when a graph break inside the
    loop over the layers makes it compile layers on their own. The rewrite bakes in which layer
    (and slot) the parameters are, so it must only run for those very parameters.
    """
    from torch._dynamo.guards import GuardBuilder

    guards = torch._guards.TracingContext.get().guards_context.dynamo_guards
    for node in gm.graph.find_nodes(op="placeholder"):
        if node.name in names:
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
