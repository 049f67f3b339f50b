"""A roofline estimate of the work before or after a node."""

from __future__ import annotations

import math
import operator

import torch
from torch import fx
from torch.multiprocessing.reductions import StorageWeakRef


class WorkEstimate:
    """Estimated run time, in bytes of memory traffic, of the nodes before or after a node of
    the graph before the rewrite (nodes it adds cost nothing): how much compute a copy started
    there can hide behind. A roofline per node (`_node_cost`), not a count of nodes: a language
    model's tail (norm, lm_head) is one or two nodes but as long as two or three layers."""

    def __init__(self, graph: fx.Graph) -> None:
        self._before: dict[fx.Node, float] = {}
        self._cost: dict[fx.Node, float] = {}
        total = 0.0
        for node in graph.nodes:
            self._before[node] = total
            self._cost[node] = _node_cost(node)
            total += self._cost[node]
        self._total = total

    def before(self, node: fx.Node) -> float:
        """Work of the nodes strictly before ``node``."""
        return self._before[node]

    def after(self, node: fx.Node) -> float:
        """Work of the nodes strictly after ``node``."""
        return self._total - self._before[node] - self._cost[node]


# bf16 dense matmul throughput over memory bandwidth of current GPUs (H100: about 990 TFLOP/s
# and 3.35 TB/s): a node costs max(its FLOPs / this, the bytes it reads and writes).
_FLOPS_PER_BYTE = 300.0
_LINEAR = {torch._C._nn.linear, torch.nn.functional.linear}
_MATMUL = {torch.matmul, operator.matmul, torch.mm, torch.bmm, torch.Tensor.matmul}
_ATTENTION = {torch._C._nn.scaled_dot_product_attention}
_GATHER = {torch.nn.functional.embedding, torch.embedding}


def _node_cost(node: fx.Node) -> float:
    """Roofline estimate of one node from its example values (symbolic sizes at their hint)."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return 0.0
    out = node.meta.get("example_value")
    inputs = [a.meta.get("example_value") for a in node.args if isinstance(a, fx.Node)]
    inputs = [t for t in inputs if isinstance(t, torch.Tensor)]
    if not isinstance(out, torch.Tensor):
        return 0.0
    if any(_same_storage(out, t) for t in inputs):
        return 0.0  # a view: no memory traffic of its own
    if node.target in _GATHER:  # reads the rows it returns, not the whole table
        return 2.0 * _numel(out) * out.element_size()
    moved = sum(_numel(t) * t.element_size() for t in [out, *inputs])
    flops = 0.0
    if inputs and inputs[0].dim():
        matmul = node.target in _LINEAR or node.target in _MATMUL
        if matmul or (node.op == "call_method" and node.target in ("matmul", "__matmul__")):
            flops = 2.0 * _numel(out) * _hint(inputs[0].shape[-1])
        elif node.target in _ATTENTION and len(inputs) >= 2:
            flops = 4.0 * _numel(inputs[0]) * _hint(inputs[1].shape[-2])  # QK^T and PV
    return max(flops / _FLOPS_PER_BYTE, float(moved))


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return StorageWeakRef(a.untyped_storage()) == StorageWeakRef(b.untyped_storage())


def _numel(tensor: torch.Tensor) -> int:
    return math.prod(_hint(size) for size in tensor.shape)


def _hint(size: int | torch.SymInt) -> int:
    """A size, or the value a symbolic size was traced with."""
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        return int(hint) if hint is not None else 1
    return int(size)
