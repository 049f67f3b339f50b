"""Binding Dynamo's graph to offloaded memory: which placeholders read offloaded parameters, and
what each reads instead. Between the pure plan (`planning`) and the FX rewrite (`passes`), this
step moves weights to host memory and allocates slots; it runs outside Dynamo's fake mode.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import fx

from .config import OffloadConfig
from .discovery import (
    LayerDiscoveryError,
    candidate_roots,
    find_stack,
    known_stacks,
    param_placeholders,
    remember,
)
from .host_memory import offload_parameters
from .passes import FetchRead, SlotRead
from .planning import plan_prefetch, plan_uva, shared_parameters
from .runtime.prefetcher import OffloadRuntime
from .runtime.registry import fetcher_for, runtime_for
from .schedule import Schedule

log = logging.getLogger(__name__)

_INFERENCE_ONLY = (
    "the offload backend compiles inference only: call the compiled model under "
    "torch.no_grad() or torch.inference_mode()"
)


def graph_device(gm: fx.GraphModule, example_inputs: list[torch.Tensor]) -> torch.device:
    """The device of the graph's parameters (one), else of its first tensor input, else CPU."""
    devices = {p.param.device for p in param_placeholders(gm)}
    if len(devices) > 1:
        raise ValueError(
            f"the model's parameters are on several devices ({sorted(map(str, devices))}); "
            "place the model on one device first (offload_compiler.place_model)"
        )
    if devices:
        return devices.pop()
    tensors = (x for x in example_inputs if isinstance(x, torch.Tensor))
    return next((x.device for x in tensors), torch.device("cpu"))


def bind_slot_reads(
    gm: fx.GraphModule, config: OffloadConfig, schedule: Schedule
) -> tuple[dict[str, SlotRead], list[OffloadRuntime]]:
    """The slot each placeholder of an offloaded parameter reads instead, and the runtimes of
    the stacks the graph touches (created on first use: weights moved, slots allocated)."""
    placeholders = {id(p.param): p for p in param_placeholders(gm)}
    stacks = known_stacks([p.param for p in placeholders.values()])
    known = {id(p) for stack in stacks for p in stack.layers.parameters()}
    # parameters outside every known stack (an embedding, or a stack not planned yet): look for
    # stacks on the graph's roots too
    roots = candidate_roots(gm) if any(key not in known for key in placeholders) else []
    errors = []
    for root in roots:
        try:
            found = find_stack(root, config.layers_path)
        except LayerDiscoveryError as err:
            errors.append(err)
            continue
        # a part of a known stack (an encoder compiled on its own) is that stack's
        if any(id(p) not in known for p in found.layers.parameters()):
            stacks.append(found)
    if roots and not stacks:
        raise errors[0]
    reads: dict[str, SlotRead] = {}
    runtimes = []
    for stack in stacks:
        layers = stack.layers
        plan = plan_prefetch(stack, config.prefetch, shared_parameters(layers, stack.root))
        in_graph = [
            (layer, name, placeholders[id(param)])
            for layer in plan.layers
            for name, param in layers[layer.index].named_parameters()
            if name in layer.params and id(param) in placeholders
        ]
        if not in_graph:
            continue
        if torch.is_grad_enabled() and any(p.param.requires_grad for *_, p in in_graph):
            raise RuntimeError(_INFERENCE_ONLY)
        runtime = runtime_for(layers, plan, schedule)
        remember(stack)
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


def bind_uva_reads(
    gm: fx.GraphModule, config: OffloadConfig, schedule: Schedule
) -> dict[str, FetchRead]:
    """Offload the UVA plan's parameters to pinned host memory; say which placeholders must be
    copied to the device before use: none where the device reads them in place (CUDA, unless
    ``uva.use_unified_addressing`` or ``OFFLOAD_COMPILER_DISABLE_UVA``, as vLLM's, says not)."""
    if config.uva.cpu_offload_gb == 0:
        log.warning("offload (uva): uva.cpu_offload_gb is 0, so nothing is offloaded")
    placeholders = {id(p.param): p for p in param_placeholders(gm)}
    reads: dict[str, FetchRead] = {}
    device = schedule.device
    for root in candidate_roots(gm):
        plan = plan_uva(root, config.uva)
        params = dict(root.named_parameters())
        chosen = [params[name] for name in plan.params]
        if not chosen:
            continue
        if torch.is_grad_enabled() and any(p.requires_grad for p in chosen):
            raise RuntimeError(_INFERENCE_ONLY)
        hosts = offload_parameters(chosen, device)
        in_place = (
            device.type == "cuda"
            and config.uva.use_unified_addressing
            and os.environ.get("OFFLOAD_COMPILER_DISABLE_UVA", "0") in ("", "0")
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


def _identifier(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)
