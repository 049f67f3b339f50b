"""Which module holds the repeated blocks, and which graph placeholder is which parameter.

Dynamo hands the backend parameters as placeholders whose ``meta["grapharg"].source`` spells the
attribute path from a frame local or global, e.g.
``L['self']._modules['layers']._modules['3']._modules['mlp']._parameters['weight']``. The path
gives the parameter's fully qualified name relative to the root module, and so its layer index in
the ModuleList: that index is global across the model, so several graphs of one model (graph
breaks) agree on layer numbers and slots.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import fx, nn


class LayerDiscoveryError(ValueError):
    """The model has no usable list of repeated blocks (or the given path names none)."""


def find_layer_list(root: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The ModuleList of repeated blocks: ``path`` if given, else the longest one in ``root``.

    A block is a child module that has parameters, so lists of activation functions or empty
    containers do not count. Ties go to the first list in registration order.
    """
    if path is not None:
        try:
            module = root.get_submodule(path)
        except AttributeError as err:
            raise LayerDiscoveryError(
                f"layers_path={path!r} does not name a submodule of "
                f"{type(root).__name__}: {err}. Candidates: {_candidates(root) or 'none'}"
            ) from None
        if not isinstance(module, nn.ModuleList):
            raise LayerDiscoveryError(
                f"layers_path={path!r} names a {type(module).__name__}, not an nn.ModuleList"
            )
        if len(module) == 0:
            raise LayerDiscoveryError(f"layers_path={path!r} names an empty nn.ModuleList")
        return path, module
    candidates = _candidate_lists(root)
    if not candidates:
        raise LayerDiscoveryError(
            f"{type(root).__name__} has no nn.ModuleList of blocks with parameters to offload; "
            "offloading works on the repeated layers of a model (e.g. model.layers). Name the "
            "list with the option layers_path='...'."
        )
    return max(candidates, key=lambda item: len(item[1]))


def _candidate_lists(root: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    return [
        (name, module)
        for name, module in root.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and all(any(True for _ in child.parameters()) for child in module)
    ]


def _candidates(root: nn.Module) -> str:
    return ", ".join(f"{name} ({len(m)})" for name, m in _candidate_lists(root))


@dataclass(frozen=True)
class ParamPlaceholder:
    """A placeholder of Dynamo's graph that reads a parameter of ``root``."""

    node: fx.Node
    root: nn.Module
    fqn: str  # relative to root, e.g. "layers.3.mlp.weight"
    param: torch.Tensor


# <base>(._modules['a'])*._parameters['w']: the shape of a parameter source under
# inline_inbuilt_nn_modules. The base is evaluated in the frame to find the root module.
_PARAM_SOURCE = re.compile(
    r"^(?P<base>.+?)(?P<mods>(?:\._modules\['[^']+'\])*)\._parameters\['(?P<param>[^']+)'\]$"
)
_MODULE_KEY = re.compile(r"\._modules\['([^']+)'\]")


def _source_name(source: object) -> str:
    name = source.name  # a property on torch >= 2.11, a method before
    return name() if callable(name) else name


def _frame_scope() -> dict[str, object]:
    """``L`` and ``G`` of the frame Dynamo is compiling, to evaluate placeholder sources."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    tx = InstructionTranslator.current_tx()
    if tx is None:
        raise RuntimeError("the offload backend must be called by Dynamo (torch.compile)")
    return {"L": tx.f_locals, "G": tx.f_globals}


def param_placeholders(gm: fx.GraphModule) -> list[ParamPlaceholder]:
    """Every placeholder of ``gm`` that is a parameter of an ``nn.Module``, with its root."""
    scope: dict[str, object] | None = None
    found = []
    for node in gm.graph.find_nodes(op="placeholder"):
        grapharg = node.meta.get("grapharg")
        example = getattr(grapharg, "example", None)
        if not isinstance(example, nn.Parameter):
            continue
        match = _PARAM_SOURCE.match(_source_name(grapharg.source))
        if match is None:
            continue
        if scope is None:
            scope = _frame_scope()
        root = eval(match["base"], {}, scope)  # a source is a Python expression over L and G
        if not isinstance(root, nn.Module):
            continue
        fqn = ".".join([*_MODULE_KEY.findall(match["mods"]), match["param"]])
        found.append(ParamPlaceholder(node, root, fqn, example))
    return found
