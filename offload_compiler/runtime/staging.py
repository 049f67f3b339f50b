"""CUDA graphs launched on a stream of their own: the inputs staged into static buffers.

Cudagraph trees copy each non-static input (the token ids) into the graph's buffer with a kernel
on the current stream before each replay, and some recordings replay slower when any kernel
precedes their launch on their stream (docs/configuration.md). So each such input is copied into
a static buffer of ours on the caller's stream, and the graph is called on a stream that carries
only the graphs' launches and the waits that order them with the caller's stream.

Staged, as the next call overwrites the buffer, is only a contiguous CUDA tensor that no node may
mutate and no output aliases, of a graph that computes no gradient (its backward would save it);
if any input trees would copy is not stageable, the graph is called as it is.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.multiprocessing.reductions import StorageWeakRef

log = logging.getLogger(__name__)

_STATIC = "_dynamo_static_input_type"


@dataclass(frozen=True)
class Staging:
    """Which inputs of a compiled graph are staged, their buffers, and the stream its calls are
    issued on. One buffer per input and size: trees record each shape of a dynamic graph as a
    graph of its own, whose static input is that shape's buffer."""

    indices: tuple[int, ...]
    stream: torch.cuda.Stream
    buffers: dict[tuple[int, torch.Size, tuple[int, ...]], torch.Tensor] = field(
        default_factory=dict
    )

    def call(self, compiled: Callable[..., Any], args: Sequence[Any]) -> Any:
        """``compiled(*args)`` with the staged inputs copied in on the caller's stream and the
        call issued on the staging stream, between the caller's work and its next."""
        caller = torch.cuda.current_stream(self.stream.device)
        staged = list(args)
        for index in self.indices:
            arg = staged[index]
            key = (index, arg.size(), arg.stride())
            if key not in self.buffers:
                self.buffers[key] = torch.empty_strided(
                    arg.size(), arg.stride(), dtype=arg.dtype, device=arg.device
                )
            staged[index] = self.buffers[key].copy_(arg)
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            outputs = compiled(*staged)
        caller.wait_stream(self.stream)
        return outputs


def stage_inputs(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Staging | None:
    """Stage the inputs of ``gm`` (real tensors ``example_inputs``) that cudagraph trees would
    copy, marking them static, or None (``gm`` untouched) if one cannot be or there are none."""
    if torch.is_grad_enabled() and any(
        isinstance(example, torch.Tensor) and example.requires_grad for example in example_inputs
    ):
        log.debug("offload: the graph computes gradients; its inputs are not staged")
        return None
    placeholders = gm.graph.find_nodes(op="placeholder")[: len(example_inputs)]
    copied = [
        (index, node)
        for index, (node, example) in enumerate(zip(placeholders, example_inputs, strict=True))
        if isinstance(example, torch.Tensor)
        and example.device.type == "cuda"
        and not node.meta.get("tensor_dict", {}).get(_STATIC)
    ]
    if not copied:
        log.debug("offload: no input to stage (none on CUDA, or all static)")
        return None
    refused = [node.name for _, node in copied if not _stageable(gm, node)]
    if refused:
        log.debug("offload: inputs %s cannot be staged; CUDA graphs replay as trees do", refused)
        return None
    # a buffer takes the input's strides, which must then describe memory a copy can fill
    scattered = [node.name for i, node in copied if not example_inputs[i].is_contiguous()]
    if scattered:
        log.debug("offload: inputs %s are not contiguous; they are not staged", scattered)
        return None
    for _, node in copied:
        node.meta["tensor_dict"] = {**node.meta.get("tensor_dict", {}), _STATIC: "unguarded"}
    device = example_inputs[copied[0][0]].device
    with torch.cuda.device(device):
        stream = torch.cuda.Stream(device)
    log.debug("offload: staging inputs %s; CUDA graphs launch on their own stream", copied)
    return Staging(tuple(i for i, _ in copied), stream)


def _stageable(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A tensor input without gradient that no node may mutate and no output is, nor views."""
    value = node.meta.get("example_value")
    if not isinstance(value, torch.Tensor) or value.requires_grad:
        return False
    storage = StorageWeakRef(value.untyped_storage())
    outputs = set(gm.graph.find_nodes(op="output")[0].all_input_nodes)
    return not any(
        alias in outputs or any(_may_mutate(user) for user in alias.users)
        for alias in gm.graph.nodes
        if isinstance(aliased := alias.meta.get("example_value"), torch.Tensor)
        and StorageWeakRef(aliased.untyped_storage()) == storage
    )


def _may_mutate(node: fx.Node) -> bool:
    """Whether ``node`` may write to a tensor argument (conservative: an in-place method or
    function, item assignment, ``out=``, an op with mutable arguments, a submodule call)."""
    if node.op == "call_module":
        return True
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("__")
    if node.op != "call_function":
        return False
    target = node.target
    if target is operator.setitem or "out" in node.kwargs:
        return True
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return schema.is_mutable
    name = getattr(target, "__name__", "")
    return name.endswith("_") and not name.startswith("__")
