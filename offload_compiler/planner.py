"""A GPU memory budget in, the placement that fits it and runs fastest out.

The budget covers what the offloaded model holds on the device: resident weights, the slot pool,
the activation workspace of the largest token count asked for, and a reserve the user keeps (a
KV cache). A forward with prefetch offloading takes max(compute, offloaded bytes / H2D
bandwidth) when the offloaded layers are spread so that resident compute hides their copies
(per-parameter streaming reaches 1.00-1.03x of that bound; docs/benchmarks.md), so for every
token count the fastest placement that fits is the one that offloads the fewest bytes: whole
layers, evenly spread, then the largest parameters of one more layer where a whole one would
free more than needed. Nothing here touches device memory; the costs come from `costs`.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .budget import MemoryAmount, device_total_bytes, human, to_bytes
from .config import OffloadConfig, PrefetchOffloadConfig
from .discovery import LayersPath, find_stack
from .planning import shared_parameters

log = logging.getLogger(__name__)


class BudgetError(MemoryError):
    """The budget is below what the model needs with every layer offloaded."""


@dataclass(frozen=True)
class Costs:
    """The machine's figures the prediction uses, and where they come from."""

    h2d_gbps: float  # pinned host -> device copies on a side stream
    tflops: float  # dense GEMM throughput in the model's dtype
    hbm_gbps: float  # device memory bandwidth
    source: str


@dataclass(frozen=True)
class Memory:
    """Device bytes of a placement, by what holds them."""

    resident: int
    slots: int
    workspace: int
    reserve: int

    @property
    def total(self) -> int:
        return self.resident + self.slots + self.workspace + self.reserve


@dataclass(frozen=True)
class Plan:
    """A placement for a budget: the configuration to compile with, its memory and the
    predicted time per forward at each token count asked for."""

    config: OffloadConfig
    budget: int
    memory: Memory
    offloaded_bytes: int
    tokens: tuple[int, ...]
    compute_ms: tuple[float, ...]
    copy_ms: float
    costs: Costs = field(repr=False)

    @property
    def predicted_ms(self) -> tuple[float, ...]:
        return tuple(max(c, self.copy_ms) for c in self.compute_ms)

    def __str__(self) -> str:
        prefetch = self.config.prefetch
        m = self.memory
        parts = dict(prefetch.offload_layer_params)
        layers = ", ".join(f"{i}{'*' if i in parts else ''}" for i in prefetch.offload_layers)
        lines = [
            f"offload plan for a budget of {human(self.budget)} "
            f"(config hash {self.config.compute_hash()[:12]})",
            f"  offloaded layers of {_joined(self.config.layers_path)}: {layers or 'none'}"
            + (" (* part of the layer: " + _parts(parts) + ")" if parts else ""),
            f"  offloaded {human(self.offloaded_bytes)}; device memory {human(m.total)} = "
            f"resident {human(m.resident)} + slots {human(m.slots)} "
            f"({prefetch.offload_prefetch_step} step) + workspace {human(m.workspace)} + "
            f"reserve {human(m.reserve)}; {human(self.budget - m.total)} left",
            f"  costs: H2D {self.costs.h2d_gbps:.1f} GB/s, {self.costs.tflops:.0f} TFLOPS, "
            f"{self.costs.hbm_gbps:.0f} GB/s device memory ({self.costs.source})",
            "",
            "| tokens | compute ms | copies ms | predicted ms |",
            "|---:|---:|---:|---:|",
        ]
        for tokens, compute, predicted in zip(
            self.tokens, self.compute_ms, self.predicted_ms, strict=True
        ):
            lines.append(f"| {tokens} | {compute:.2f} | {self.copy_ms:.2f} | {predicted:.2f} |")
        return "\n".join(lines)


def _joined(path: LayersPath) -> str:
    return path if isinstance(path, str) else "+".join(path or ())


def _parts(parts: dict[int, frozenset[str]]) -> str:
    return "; ".join(f"{i}: {', '.join(sorted(p))}" for i, p in parts.items())


@dataclass(frozen=True)
class _Stack:
    """What the search needs of a model: its stack's offloadable parameters per layer (name,
    bytes, elements) and everything else."""

    path: str | tuple[str, ...]
    layers: tuple[tuple[tuple[str, int, int], ...], ...]
    other_bytes: int
    other_numel: int

    def layer_bytes(self, index: int) -> int:
        return sum(nbytes for _, nbytes, _ in self.layers[index])


def _stack(model: nn.Module, layers_path: LayersPath) -> _Stack:
    found = find_stack(model, layers_path)
    layers = found.layers
    shared = shared_parameters(layers, model)
    per_layer, inside = [], set()
    for block in layers:
        params = []
        for name, param in block.named_parameters():
            inside.add(id(param))
            if id(param) not in shared:
                params.append((name, _nbytes(param), param.numel()))
        per_layer.append(tuple(params))
    seen, other_bytes, other_numel = set(), 0, 0
    for param in model.parameters():
        if id(param) in seen or (id(param) in inside and id(param) not in shared):
            continue
        seen.add(id(param))
        other_bytes, other_numel = other_bytes + _nbytes(param), other_numel + param.numel()
    other_bytes += sum(_nbytes(b) for b in model.buffers())
    return _Stack(found.option, tuple(per_layer), other_bytes, other_numel)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def spread(count: int, num_layers: int) -> list[int]:
    """``count`` layer indices spread evenly over ``num_layers``, the last layer included (as
    the group pattern offloads the end of each group: resident layers before an offloaded one
    hide its copy)."""
    return sorted({num_layers - 1 - (i * num_layers) // count for i in range(count)})


def plan(
    model: nn.Module,
    gpu_memory_budget: MemoryAmount,
    tokens: Sequence[int] = (1, 2048),
    *,
    reserve: MemoryAmount = 0,
    workspace: int | None = None,
    options: OffloadConfig | dict | None = None,
    device: torch.device | str = "cuda",
    costs: Costs | None = None,
) -> Plan:
    """The placement of ``model`` that fits ``gpu_memory_budget`` and is predicted fastest at
    ``tokens``: a configuration with explicit ``offload_layers`` (and a partial layer), to give
    to `place_model`, `load_checkpoint` and ``torch.compile`` alike.

    ``workspace`` is the device memory a forward needs beside the weights at the largest token
    count (default: `estimate_workspace`); ``reserve`` what the caller keeps for itself. Raises
    `BudgetError`, with the numbers, when even every layer offloaded does not fit.
    """
    from .costs import estimate_workspace, machine_costs  # measured or cached once

    base = OffloadConfig.from_options(options).model_copy(update={"gpu_memory_budget": None})
    device = torch.device(device)
    budget = to_bytes(gpu_memory_budget, device_total_bytes(device))
    kept = to_bytes(reserve, device_total_bytes(device))
    tokens = tuple(sorted(set(tokens)))
    stack = _stack(model, base.layers_path)
    if workspace is None:
        workspace = estimate_workspace(model, max(tokens))
    costs = costs or machine_costs(device)
    step = max(1, base.prefetch.offload_prefetch_step)
    num = len(stack.layers)
    total_layers = sum(stack.layer_bytes(i) for i in range(num))

    def memory(offloaded: dict[int, tuple[tuple[str, int, int], ...]]) -> Memory:
        # a slot holds one buffer per parameter name and shape of the layers cycling through it
        slots: list[dict[str, int]] = [{} for _ in range(min(step, len(offloaded)))]
        for position, index in enumerate(sorted(offloaded)):
            for name, nbytes, _ in offloaded[index]:
                slot = slots[position % step]
                slot[name] = max(slot.get(name, 0), nbytes)
        moved = sum(n for params in offloaded.values() for _, n, _ in params)
        slot_bytes = sum(n for slot in slots for n in slot.values())
        return Memory(stack.other_bytes + total_layers - moved, slot_bytes, workspace, kept)

    chosen: dict[int, tuple[tuple[str, int, int], ...]] | None = None
    partial: int | None = None
    for count in range(num + 1):
        whole = {i: stack.layers[i] for i in spread(count, num)}
        if memory(whole).total <= budget:
            chosen = whole
            break
        resident = [i for i in range(num) if i not in whole]
        if count < num and resident:  # these whole layers and the largest params of one more
            partial = resident[-1]
            largest_first = sorted(stack.layers[partial], key=lambda p: -p[1])
            for end in range(1, len(largest_first)):
                trial = {**whole, partial: tuple(largest_first[:end])}
                if memory(trial).total <= budget:
                    chosen = trial
                    break
            if chosen is not None:
                break
            partial = None
    if chosen is None:
        need = memory(dict(enumerate(stack.layers)))
        raise BudgetError(
            f"gpu_memory_budget {human(budget)} < minimum {human(need.total)} (resident "
            f"{human(need.resident)} + slots {human(need.slots)} + workspace "
            f"{human(need.workspace)} + reserve {human(need.reserve)}) with every layer of "
            f"{stack.path} offloaded"
        )
    part = () if partial is None else ((partial, frozenset(n for n, _, _ in chosen[partial])),)
    prefetch = PrefetchOffloadConfig(
        **{
            **base.prefetch.model_dump(),
            "offload_group_size": 0,
            "offload_num_in_group": 1,
            "offload_prefetch_step": step,
            "offload_layers": tuple(sorted(chosen)),
            "offload_layer_params": part,
        }
    )
    config = OffloadConfig(
        **{
            **base.model_dump(exclude={"prefetch", "offload_backend"}),
            "prefetch": prefetch,
            "layers_path": stack.path,
        }
    )
    offloaded = sum(n for params in chosen.values() for _, n, _ in params)
    numel = sum(n for layer in stack.layers for _, _, n in layer) + stack.other_numel
    itemsize = (stack.other_bytes + total_layers) / max(1, numel)
    return Plan(
        config=config,
        budget=budget,
        memory=memory(chosen),
        offloaded_bytes=offloaded,
        tokens=tokens,
        compute_ms=tuple(predicted_compute_ms(numel, itemsize, t, costs) for t in tokens),
        copy_ms=offloaded / (costs.h2d_gbps * 1e6),
        costs=costs,
    )


def predicted_compute_ms(numel: int, itemsize: float, tokens: int, costs: Costs) -> float:
    """A forward's compute, estimated: every weight in a GEMM (2 FLOPs per weight and token),
    no faster than reading the weights once from device memory."""
    flops = 2.0 * numel * tokens
    return max(flops / (costs.tflops * 1e9), numel * itemsize / (costs.hbm_gbps * 1e6))


_PLANNED: weakref.WeakKeyDictionary[nn.Module, dict[str, OffloadConfig]] = (
    weakref.WeakKeyDictionary()
)


def resolve_budget(config: OffloadConfig, model: nn.Module, device: torch.device) -> OffloadConfig:
    """``config`` itself, or where it gives a ``gpu_memory_budget`` the configuration `plan`
    chooses for ``model``: made once per model and config, so that `place_model`,
    `load_checkpoint` and the backend offload the very same parameters."""
    if config.gpu_memory_budget is None:
        return config
    planned = _PLANNED.setdefault(model, {})
    key = config.compute_hash()
    if key not in planned:
        base = config.model_copy(update={"gpu_memory_budget": None})
        chosen = plan(
            model,
            config.gpu_memory_budget,
            config.plan_tokens,
            reserve=config.memory_reserve,
            options=base,
            device=device,
        )
        log.info("offload: %s", chosen)
        planned[key] = chosen.config
    return planned[key]
