"""Which module holds the repeated blocks, and which graph placeholder is which parameter.

A parameter placeholder's ``meta["grapharg"].source`` spells its path from a frame local or
global (``L['self']._modules['layers']._modules['3']._parameters['weight']``); the layer list is
found on the outermost base module and parameters are matched to layers by identity, so the
graphs of one model agree on layer indices and slots."""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass

from torch import fx, nn
from torch.utils.weak import WeakIdKeyDictionary

# Parameter -> (path, list, root) of its layer list, for every list planned: a graph that reaches
# a layer's parameters from the layer alone (after a graph break in the loop over the layers)
# finds the list that place_model or an earlier graph discovered.
_KNOWN_LAYER_LISTS = WeakIdKeyDictionary()


class LayerDiscoveryError(ValueError):
    """The model has no usable list of repeated blocks (or the given path names none)."""


def find_layer_list(root: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The ModuleList of repeated blocks: ``path`` if given, else the longest one in ``root``
    (see `_candidate_lists`; ties go to the first in registration order)."""
    if path is not None:
        try:
            module = root.get_submodule(path)
        except AttributeError as err:
            found = ", ".join(f"{name} ({len(m)})" for name, m in _candidate_lists(root))
            raise LayerDiscoveryError(
                f"layers_path={path!r} does not name a submodule of "
                f"{type(root).__name__}: {err}. Candidates: {found or 'none'}"
            ) from None
        if not isinstance(module, nn.ModuleList | nn.Sequential):
            raise LayerDiscoveryError(
                f"layers_path={path!r} names a {type(module).__name__}, not an nn.ModuleList or "
                "nn.Sequential"
            )
        if len(module) == 0:
            raise LayerDiscoveryError(
                f"layers_path={path!r} names an empty {type(module).__name__}"
            )
        return path, module
    candidates = _candidate_lists(root)
    if not candidates:
        raise LayerDiscoveryError(
            f"{type(root).__name__} has no nn.ModuleList or nn.Sequential of blocks with "
            "parameters to offload; "
            "offloading works on the repeated layers of a model (e.g. model.layers). Name the "
            "list with the option layers_path='...'. If a graph break makes Dynamo compile each "
            "layer on its own, call offload_compiler.place_model(model, options) first so that "
            "the layers are known."
        )
    return max(candidates, key=lambda item: len(item[1]))


@dataclass(frozen=True)
class LayerList:
    """The repeated blocks of a model: the ModuleList, its path, and the model holding it."""

    path: str
    layers: nn.ModuleList
    root: nn.Module | None


def layer_list_of(root: nn.Module, path: str | None = None) -> LayerList:
    """`find_layer_list` on ``root``, remembered for later graphs of the same model."""
    found_path, layers = find_layer_list(root, path)
    # weak references: the entries must not keep their keys (the parameters) alive
    entry = (found_path, weakref.ref(layers), weakref.ref(root))
    for param in layers.parameters():
        _KNOWN_LAYER_LISTS[param] = entry
    return LayerList(found_path, layers, root)


def known_layer_lists(params: list[nn.Parameter]) -> list[LayerList]:
    """The remembered layer lists that hold any of ``params``."""
    found: dict[int, LayerList] = {}
    for param in params:
        entry = _KNOWN_LAYER_LISTS.get(param)
        layers = entry[1]() if entry is not None else None
        if layers is not None:
            found.setdefault(id(layers), LayerList(entry[0], layers, entry[2]()))
    return list(found.values())


def _is_stack(module: nn.Module) -> bool:
    """A non-empty ModuleList, or a Sequential of blocks of one class (timm's ``blocks``; a
    Sequential of different modules is a pipeline, such as an MLP, not a stack of layers)."""
    if isinstance(module, nn.ModuleList):
        return len(module) > 0
    return (
        isinstance(module, nn.Sequential)
        and len(module) > 1
        and len({type(child) for child in module}) == 1
    )


def _candidate_lists(root: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Non-empty stacks whose every block has parameters, not inside another such stack's
    blocks (the experts of an MoE layer can outnumber the layers, but they are not the
    layers)."""
    lists = [
        (name, module)
        for name, module in root.named_modules()
        if _is_stack(module) and all(any(True for _ in child.parameters()) for child in module)
    ]
    return [
        (name, module)
        for name, module in lists
        if not any(name.startswith(f"{outer}.") for outer, _ in lists if outer != name)
    ]


@dataclass(frozen=True)
class ParamPlaceholder:
    """A placeholder of Dynamo's graph that reads a parameter."""

    node: fx.Node
    param: nn.Parameter


def param_placeholders(gm: fx.GraphModule) -> list[ParamPlaceholder]:
    """Every placeholder of ``gm`` whose value is an ``nn.Parameter``."""
    return [
        ParamPlaceholder(node, example)
        for node in gm.graph.find_nodes(op="placeholder")
        if isinstance(example := getattr(node.meta.get("grapharg"), "example", None), nn.Parameter)
    ]


# The base of a parameter source under inline_inbuilt_nn_modules (L['self'] in the example above)
_SOURCE_BASE = re.compile(r"^(?P<base>.+?)(?:\._modules\['[^']+'\])*\._parameters\['[^']+'\]$")


def _frame_scope() -> dict[str, dict[str, object]]:
    """``L`` and ``G`` of the frame Dynamo is compiling, to evaluate placeholder sources."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    tx = InstructionTranslator.current_tx()
    if tx is None:
        raise RuntimeError("the offload backend must be called by Dynamo (torch.compile)")
    return {"L": tx.f_locals, "G": tx.f_globals}


def candidate_roots(gm: fx.GraphModule) -> list[nn.Module]:
    """The outermost modules the graph's parameters are reached from: the bases of their
    sources and the frame's local modules (after a graph break in a loop over the layers,
    ``L['layer']`` reaches a layer while ``L['self']`` holds the list). Modules inside another
    are dropped, so a block's own ModuleList is never taken for the layers."""
    scope = _frame_scope()
    modules: dict[int, nn.Module] = {}
    for placeholder in param_placeholders(gm):
        match = _SOURCE_BASE.match(placeholder.node.meta["grapharg"].source.name)
        if match is not None:
            base = eval(match["base"], {}, scope)  # a source is a Python expression over L, G
            if isinstance(base, nn.Module):
                modules.setdefault(id(base), base)
    if not modules:
        return []
    for value in scope["L"].values():
        if isinstance(value, nn.Module):
            modules.setdefault(id(value), value)
    inner = {
        id(sub) for module in modules.values() for sub in module.modules() if sub is not module
    }
    return [module for key, module in modules.items() if key not in inner]
