"""Which inputs `staging` stages: read-only CUDA inputs (the decision is made on
Dynamo's graph, so it is tested here on CPU graphs; the stream it launches on is CUDA-only and
tested in test_gpu.py)."""

from __future__ import annotations

import logging

import torch
from torch import fx, nn

from offload_compiler.runtime.staging import _stageable, stage_inputs


def _captured(fn, *inputs, dynamic: bool | None = False) -> tuple[fx.GraphModule, list]:
    """Dynamo's graph of ``fn(*inputs)`` and its example inputs."""
    found = []

    def backend(gm: fx.GraphModule, example_inputs: list) -> object:
        found.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=backend, dynamic=dynamic)(*inputs)
    torch._dynamo.reset()
    assert len(found) == 1, "one graph expected"
    return found[0]


def _input(gm: fx.GraphModule, name: str) -> fx.Node:
    nodes = [n for n in gm.graph.find_nodes(op="placeholder") if name in n.name]
    assert len(nodes) == 1, [n.name for n in gm.graph.find_nodes(op="placeholder")]
    return nodes[0]


class Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(ids))


IDS = torch.tensor([[1, 2, 3]])


def test_token_ids_read_by_an_embedding_are_stageable():
    gm, _ = _captured(Embed(), IDS)
    assert _stageable(gm, _input(gm, "ids"))


def test_an_input_mutated_in_place_is_not_staged():
    def bump(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x.add_(1)
        return x @ w

    gm, _ = _captured(bump, torch.ones(2, 2), torch.ones(2, 2))
    assert not _stageable(gm, _input(gm, "x"))
    assert _stageable(gm, _input(gm, "w"))


def test_an_input_written_through_a_view_is_not_staged():
    def write(x: torch.Tensor) -> torch.Tensor:
        x[0] = 3.0
        return x.sum()

    gm, _ = _captured(write, torch.ones(2, 2))
    assert not _stageable(gm, _input(gm, "x"))


def test_an_input_an_output_aliases_is_not_staged():
    def passthrough(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.view(-1), y * 2

    gm, _ = _captured(passthrough, torch.ones(2, 2), torch.ones(2, 2))
    assert not _stageable(gm, _input(gm, "x"))
    assert _stageable(gm, _input(gm, "y"))


def test_an_input_of_dynamic_shape_is_stageable():
    """Staged per shape: trees record each shape of a dynamic graph as a graph of its own."""
    gm, _ = _captured(Embed(), IDS, dynamic=True)
    ids = _input(gm, "ids")
    assert not all(type(size) is int for size in ids.meta["example_value"].shape)
    assert _stageable(gm, ids)


def test_cpu_inputs_are_never_staged_and_the_graph_is_left_as_it_was(caplog):
    gm, examples = _captured(Embed(), IDS)
    ids = _input(gm, "ids")
    before = dict(ids.meta.get("tensor_dict", {}))
    with caplog.at_level(logging.DEBUG, logger="offload_compiler"), torch.no_grad():
        assert stage_inputs(gm, examples) is None
    assert "no input to stage" in caplog.text
    assert ids.meta.get("tensor_dict", {}) == before


def test_a_graph_that_computes_gradients_is_not_staged(caplog):
    """Its forward saves the ids for the backward: a buffer the next call overwrites must not
    hold them. Refused before anything else is looked at (here: before the device)."""
    gm, examples = _captured(Embed(), IDS)
    assert any(isinstance(e, torch.Tensor) and e.requires_grad for e in examples)
    with caplog.at_level(logging.DEBUG, logger="offload_compiler"):
        assert stage_inputs(gm, examples) is None
    assert "computes gradients" in caplog.text
    assert "no input to stage" not in caplog.text
