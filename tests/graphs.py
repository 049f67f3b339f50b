"""Helpers that run the real rewrite on Dynamo's graph and print it compactly for expecttest."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx

from offload_compiler.backend import OffloadGraph, rewrite_graph

_OPS = {"wait_prefetch", "start_prefetch", "join_after_forward"}


def rewrites(
    model: torch.nn.Module, options: Mapping[str, Any], *inputs: Any, rejoin: bool = False
) -> list[OffloadGraph]:
    """The backend's rewrite of every graph Dynamo makes of ``model(*inputs)`` (graph breaks:
    several), through its public seam; ``rejoin``: the schedule of graphs that run as CUDA
    graphs (``prefetch.offload_capturable``)."""
    if rejoin:
        options = {**options, "prefetch": {**options["prefetch"], "offload_capturable": True}}
    found: list[OffloadGraph] = []

    def backend(gm: fx.GraphModule, example_inputs: list[torch.Tensor]):
        found.append(rewrite_graph(gm, example_inputs, options))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(*inputs)
    torch._dynamo.reset()
    return found


def _short(name: str) -> str:
    name = re.sub(r"^l_(self|s)_modules_", "", name)
    name = name.replace("_modules_", ".").replace("_parameters_", ".")
    name = re.sub(r"offload_slot_r\d+_", "slot_", name)
    return name.rstrip("_")


def _arg(arg: Any) -> str:
    if isinstance(arg, fx.Node):
        return _short(arg.name)
    if isinstance(arg, (list, tuple)):
        return "[" + ", ".join(_arg(a) for a in arg) + "]"
    return repr(arg)


def summary(gm: fx.GraphModule) -> str:
    """One line per node: slot placeholders, computations, and the offload ops with their
    layer and anchors (runtime ids left out: they depend on test order)."""
    lines = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if node.name.startswith("offload_slot"):
                lines.append(f"slot {_short(node.name)}")
            continue
        if node.op == "output":
            lines.append(f"return {_arg(node.args[0])}")
            continue
        target = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        if target == "fetch_param":  # (the fetcher id depends on test order)
            after, _fetcher_id, index = node.args
            lines.append(f"{_short(node.name)} = fetch_param(after={_arg(after)}, index={index})")
        elif target in _OPS:
            anchors, _runtime_id, last, *param = node.args
            detail = f"rejoin={last}" if target == "join_after_forward" else f"layer={last}"
            detail += "".join(f", param={p}" for p in param)
            lines.append(f"{target}({detail}, anchors={_arg(anchors)})")
        else:
            args = ", ".join(_arg(a) for a in node.args)
            lines.append(f"{_short(node.name)} = {target}({args})")
    return "\n".join(lines)


_OP_CALL = re.compile(
    r"torch\.ops\.offload\.(wait_prefetch|start_prefetch)\.default\(\[.*\], \d+, (\d+)"
    r"(?:, (?:param=)?(?:None|'([^']*)'))?\)$"
)
_ALIAS = re.compile(r"^(\w+) = (?:reinterpret_tensor\()?(\w+)\b")


def _identifier(name: str) -> str:
    return re.sub(r"\W", "_", name)


def unfenced_slot_reads(
    code: str, slot_args: dict[str, tuple[int, str]], slot_of_layer: dict[int, int]
) -> tuple[list[str], int]:
    """Lines of Inductor's ``call`` that read a slot buffer while a copy into it is in flight,
    and how many offload ops the check saw (so that a check that saw none cannot pass).

    ``slot_args`` maps the generated code's input names (``arg12_1``) of slot buffers to their
    (slot, parameter identifier); ``slot_of_layer`` maps layer indices to slots. A copy into a
    slot's buffers (all of them, or one parameter's) is in flight from ``start_prefetch`` of a
    layer of that slot until that layer's ``wait_prefetch`` of the same unit.
    """
    start = code.index("def call(self, args):")
    indent = len(code[:start].rsplit("\n", 1)[-1])
    aliases = dict(slot_args)
    in_flight: dict[tuple[int, str | None], int] = {}  # (slot, param or None) -> layer
    bad, seen = [], 0
    for raw in code[start:].splitlines()[1:]:
        if raw.strip() and len(raw) - len(raw.lstrip()) <= indent:
            break  # the end of call()
        line = raw.strip()
        if not line or line.startswith(("#", "del ", "assert_size_stride", "return ")):
            continue
        op = _OP_CALL.search(line)
        if op:
            seen += 1
            kind, layer = op.group(1), int(op.group(2))
            unit = (slot_of_layer[layer], _identifier(op.group(3)) if op.group(3) else None)
            if kind == "start_prefetch":
                in_flight[unit] = layer
            elif in_flight.get(unit) == layer:
                del in_flight[unit]
            continue
        alias = _ALIAS.match(line)
        if alias and alias.group(2) in aliases:
            aliases[alias.group(1)] = aliases[alias.group(2)]
        names = set(re.findall(r"\b\w+\b", line))
        for name, (slot, param) in aliases.items():
            if name in names and ((slot, None) in in_flight or (slot, param) in in_flight):
                bad.append(line)
    return bad, seen
