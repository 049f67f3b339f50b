"""Models that push the rewrite: tied and shared weights, buffers, mixed shapes, bad input."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch
from torch import nn

import offload_compiler
from offload_compiler.runtime import registry as runtime_module
from tests.common import prefetch_options
from tests.models import MLPStack, clone_model


def _equal_over_calls(model, options, make_input, calls=3):
    reference = torch.compile(clone_model(model))
    compiled = torch.compile(model, backend="offload", options=options)
    with torch.no_grad():
        for _ in range(calls):
            x = make_input()
            torch.testing.assert_close(compiled(x), reference(x), rtol=1e-5, atol=1e-5)


class TiedHead(nn.Module):
    """lm_head shares its weight with layer 1's projection (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(16, 16, bias=False) for _ in range(4))
        self.head = nn.Linear(16, 16, bias=False)
        self.head.weight = self.layers[1].weight

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


def test_weight_tied_outside_its_layer_stays_resident(caplog):
    torch.manual_seed(0)
    model = TiedHead()
    with caplog.at_level(logging.WARNING, logger="offload_compiler"):
        _equal_over_calls(model, prefetch_options(step=2), lambda: torch.randn(3, 16))
    assert any("layers.1: weight also used outside the layer" in r.message for r in caplog.records)
    plan = runtime_module._BY_STACK[model.layers].plan
    assert [layer.index for layer in plan.layers] == [0, 2, 3]


@pytest.mark.parametrize("per_param", [True, False])
def test_parameter_shared_by_two_layers_stays_resident(per_param, caplog):
    """Layers 0 and 3 then offload only their bias: per parameter, layer 0 has no weight
    span to start layer 2's weight after, and layer 1's weight has no counterpart in layer 3
    (this raised a KeyError in the copy before per-parameter starts followed the plan)."""
    torch.manual_seed(0)
    model = MLPStack(layers=4, dim=16)
    model.blocks[3].fc.weight = model.blocks[0].fc.weight
    options = prefetch_options(step=2, per_param=per_param)
    with caplog.at_level(logging.WARNING, logger="offload_compiler"):
        _equal_over_calls(model, options, lambda: torch.randn(3, 16))
    plan = runtime_module._BY_STACK[model.blocks].plan
    assert plan.layer_at(0).params == ("fc.bias",)
    assert plan.layer_at(3).params == ("fc.bias",)
    assert plan.layer_at(1).params == ("fc.weight", "fc.bias")


class ScaledBlock(nn.Module):
    def __init__(self, dim: int, scale: float) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.register_buffer("scale", torch.full((dim,), scale))

    def forward(self, x):
        return torch.relu(self.fc(x)) * self.scale + x


class WithBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ScaledBlock(16, 0.5 + i) for i in range(4))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_buffers_in_offloaded_layers_stay_resident_and_are_used():
    torch.manual_seed(0)
    model = WithBuffers()
    _equal_over_calls(model, prefetch_options(step=1), lambda: torch.randn(3, 16))
    plan = runtime_module._BY_STACK[model.layers].plan
    assert all(layer.params == ("fc.weight", "fc.bias") for layer in plan.layers)


class Funnel(nn.Module):
    """Layers of different shapes in one ModuleList."""

    def __init__(self) -> None:
        super().__init__()
        dims = [16, 32, 8, 24, 16]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


@pytest.mark.parametrize("step", [1, 2, 3])
def test_layers_of_different_shapes_get_their_own_slot_buffers(step):
    torch.manual_seed(0)
    model = Funnel()
    _equal_over_calls(model, prefetch_options(step=step), lambda: torch.randn(3, 16))
    runtime = runtime_module._BY_STACK[model.layers]
    for layer in range(4):
        slots = runtime.slot_tensors(layer)
        assert slots["weight"].shape == model.layers[layer].weight.shape


def test_training_mode_under_no_grad_is_correct():
    torch.manual_seed(0)
    model = MLPStack(layers=4, dim=16).train()
    _equal_over_calls(model, prefetch_options(step=2), lambda: torch.randn(3, 16))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_place_model_on_cuda_without_a_gpu_is_a_clear_error():
    model = MLPStack(layers=2, dim=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="needs a CUDA GPU and none is available"):
        offload_compiler.place_model(model, prefetch_options(), "cuda")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
