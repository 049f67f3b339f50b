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

# Parameter -> the stack it was planned in, for every stack planned: a graph that reaches a
# layer's parameters from the layer alone (after a graph break in the loop over the layers, or
# an encoder compiled on its own) finds the stack that place_model or an earlier graph found.
_KNOWN_STACKS = WeakIdKeyDictionary()
# Model -> {paths: the ModuleList concatenating its stacks}: one object per model and paths, as
# the runtime of the stack is found by it.
_CONCATENATED = WeakIdKeyDictionary()

LayersPath = str | tuple[str, ...] | None


class LayerDiscoveryError(ValueError):
    """The model has no usable list of repeated blocks (or the given path names none)."""


@dataclass(frozen=True)
class Stack:
    """The repeated blocks of a model in execution order: one ``ModuleList`` (or ``Sequential``)
    or several concatenated, such as T5's encoder and decoder blocks, whose offloaded layers then
    form one prefetch ring. A layer's index is its position in the concatenation."""

    paths: tuple[str, ...]
    lengths: tuple[int, ...]
    layers: nn.Module
    """The blocks: the stack itself, or a ``ModuleList`` concatenating the stacks."""
    root: nn.Module | None

    @property
    def name(self) -> str:
        """The paths joined by ``+`` (``encoder.block+decoder.block``), for messages."""
        return "+".join(self.paths)

    @property
    def option(self) -> str | tuple[str, ...]:
        """The ``layers_path`` option naming this stack."""
        return self.paths[0] if len(self.paths) == 1 else self.paths

    def block_name(self, index: int) -> str:
        """The qualified name of block ``index`` (``decoder.block.2``)."""
        for path, length in zip(self.paths, self.lengths, strict=True):
            if index < length:
                return f"{path}.{index}"
            index -= length
        raise IndexError(f"{self.name} has {sum(self.lengths)} blocks, not {index}")


def find_stack(root: nn.Module, path: LayersPath = None) -> Stack:
    """The repeated blocks of ``root``: the stacks ``path`` names (one path or several, in
    execution order), else every stack found (`_candidate_lists`) in registration order, which
    is execution order for encoder-decoder models (T5, Whisper) and Flux's two block lists."""
    if isinstance(path, str):
        found = [(path, _named_stack(root, path))]
    elif path:
        found = [(p, _named_stack(root, p)) for p in path]
        for outer, _ in found:
            inner = [p for p, _ in found if p != outer and p.startswith(f"{outer}.")]
            if inner or [p for p, _ in found].count(outer) > 1:
                raise LayerDiscoveryError(
                    f"layers_path names {outer!r} and {(inner or [outer])[0]!r}: each block "
                    "must belong to one stack"
                )
    else:
        found = _candidate_lists(root)
        if not found:
            raise LayerDiscoveryError(
                f"{type(root).__name__} has no nn.ModuleList or nn.Sequential of blocks with "
                "parameters to offload; offloading works on the repeated layers of a model (e.g. "
                "model.layers). Name the list with the option layers_path='...'. If a graph "
                "break makes Dynamo compile each layer on its own, call "
                "offload_compiler.place_model(model, options) first so that the layers are known."
            )
    paths = tuple(p for p, _ in found)
    lengths = tuple(len(m) for _, m in found)
    if len(found) == 1:
        return Stack(paths, lengths, found[0][1], root)
    blocks = [block for _, module in found for block in module]
    by_paths = _CONCATENATED.setdefault(root, {})
    layers = by_paths.get(paths)
    if (
        layers is None
        or len(layers) != len(blocks)
        or any(a is not b for a, b in zip(layers, blocks, strict=True))
    ):
        layers = by_paths[paths] = nn.ModuleList(blocks)
    return Stack(paths, lengths, layers, root)


def _named_stack(root: nn.Module, path: str) -> nn.Module:
    """The ModuleList or Sequential at ``path``, or an error naming the candidates."""
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
        raise LayerDiscoveryError(f"layers_path={path!r} names an empty {type(module).__name__}")
    return module


def stack_of(root: nn.Module, path: LayersPath = None) -> Stack:
    """`find_stack` on ``root``, remembered for later graphs of the same model."""
    stack = find_stack(root, path)
    remember(stack)
    return stack


def remember(stack: Stack) -> None:
    """Make `known_stacks` find ``stack`` by any of its parameters."""
    # weak references: the entries must not keep their keys (the parameters) alive
    root = weakref.ref(stack.root) if stack.root is not None else lambda: None
    entry = (stack.paths, stack.lengths, weakref.ref(stack.layers), root)
    for param in stack.layers.parameters():
        _KNOWN_STACKS[param] = entry


def known_stacks(params: list[nn.Parameter]) -> list[Stack]:
    """The remembered stacks that hold any of ``params``."""
    found: dict[int, Stack] = {}
    for param in params:
        entry = _KNOWN_STACKS.get(param)
        layers = entry[2]() if entry is not None else None
        if layers is not None:
            found.setdefault(id(layers), Stack(entry[0], entry[1], layers, entry[3]()))
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


def _candidate_lists(root: nn.Module) -> list[tuple[str, nn.Module]]:
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
