"""CUDA graphs launched on a stream of their own: the inputs staged into static buffers.

Under ``mode="reduce-overhead"`` cudagraph trees copy each input that is not static (the token
ids) into the graph's own buffer, with a kernel on the current stream, right before each replay.
On the H100 some recordings of an offloaded model (of several of identical code in one process,
one or two) replay 3% slower at decode when any kernel precedes their launch on the same stream
(that copy, a one-element fill, a serving loop's sampling), and as fast as default mode when
launched back to back or from a stream of their own with the kernel on the caller's
(docs/configuration.md). So here each such input is copied into a buffer of
ours on the caller's stream, marked static (trees copy nothing), and the compiled graph is
called on a stream that carries nothing but the graphs' launches and the waits that order them
with the caller's stream.

An input is staged only where that cannot change what the model computes: in a graph that
computes no gradient (one recorded for training saves inputs such as the token ids for its
backward, which a staged buffer overwritten by the next forward would change), a CUDA tensor of
contiguous memory that no node of the graph may mutate and no output aliases (a staged buffer is
overwritten by the next call). If any input trees would copy is not stageable, the graph is
called as it is.
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
    """Which inputs of a compiled graph are staged, their buffers, and the stream its calls
    are issued on.

    One buffer per input and size: a graph of dynamic shape gets each shape it is called with
    recorded by trees as a graph of its own, whose static input is that shape's buffer.
    """

    indices: tuple[int, ...]
    stream: torch.cuda.Stream
    buffers: dict[tuple[int, torch.Size, tuple[int, ...]], torch.Tensor] = field(
        default_factory=dict
    )

    def call(self, compiled: Callable[..., Any], args: Sequence[Any]) -> Any:
        """``compiled(*args)`` with the staged inputs copied in on the caller's stream and the
        call issued on the staging stream, ordered after the caller's work and before the
        caller's next."""
        caller = torch.cuda.current_stream(self.stream.device)
        staged = list(args)
        for index in self.indices:
            arg = staged[index]
            key = (index, arg.size(), arg.stride())
            buffer = self.buffers.get(key)
            if buffer is None:
                buffer = torch.empty_strided(
                    arg.size(), arg.stride(), dtype=arg.dtype, device=arg.device
                )
                self.buffers[key] = buffer
            buffer.copy_(arg)
            staged[index] = buffer
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            outputs = compiled(*staged)
        caller.wait_stream(self.stream)
        return outputs


def stage_inputs(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Staging | None:
    """Stage the inputs of ``gm`` that cudagraph trees would copy, marking their placeholders
    static, or None (and ``gm`` untouched) if some of them cannot be staged or none exist.

    ``example_inputs`` are the real tensors of the first ``len(example_inputs)`` placeholders.
    """
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
    """A tensor input without gradient that the graph reads only: no node may mutate it or a
    view of it, and no output may be it or a view of it."""
    value = node.meta.get("example_value")
    if not isinstance(value, torch.Tensor) or value.requires_grad:
        return False
    storage = StorageWeakRef(value.untyped_storage())
    outputs = set(gm.graph.find_nodes(op="output")[0].all_input_nodes)
    for alias in gm.graph.nodes:
        aliased = alias.meta.get("example_value")
        if not isinstance(aliased, torch.Tensor):
            continue
        if StorageWeakRef(aliased.untyped_storage()) != storage:
            continue
        if alias in outputs or any(_may_mutate(user) for user in alias.users):
            return False
    return True


def _may_mutate(node: fx.Node) -> bool:
    """Whether ``node`` may write to one of its tensor arguments (conservative: any in-place
    method or function, item assignment, an ``out=`` argument, an op with mutable arguments,
    or a submodule call)."""
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
