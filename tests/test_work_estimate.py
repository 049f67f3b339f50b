"""The roofline work estimate that decides where a copy for the next call starts."""

from __future__ import annotations

import pytest
import torch

from offload_compiler.passes.work_estimate import WorkEstimate, _node_cost
from tests.models import LlamaShaped


def test_work_estimate_sums_node_costs_before_and_after_each_node():
    """The work before and after a node, as prefix sums, equals the plain sums of the nodes'
    roofline costs; the lm_head of a large vocabulary outweighs a decoder layer."""

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    model = LlamaShaped(layers=2, dim=32, heads=4, kv_heads=2, hidden=64, vocab=4096)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(torch.randint(0, 4096, (1, 8)))
    torch._dynamo.reset()
    (gm,) = graphs
    nodes = list(gm.graph.nodes)
    costs = [_node_cost(node) for node in nodes]
    work = WorkEstimate(gm.graph)
    for i, node in enumerate(nodes):
        assert work.before(node) == pytest.approx(sum(costs[:i]))
        assert work.after(node) == pytest.approx(sum(costs[i + 1 :]))
    lm_head = max(nodes, key=_node_cost)
    assert "lm_head" in str(lm_head.args)
    assert work.before(lm_head) < _node_cost(lm_head)  # both layers and the embedding
