"""Finding the layer list, and the frame's outermost modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from offload_compiler.discovery import (
    LayerDiscoveryError,
    candidate_roots,
    find_stack,
    known_stacks,
    param_placeholders,
    stack_of,
)
from tests.models import LlamaShaped, TwoStacks


class Nested(nn.Module):
    """A short list of blocks, a longer list of activations (no parameters), and blocks with
    ModuleLists of their own (experts)."""

    def __init__(self) -> None:
        super().__init__()
        self.acts = nn.ModuleList(nn.ReLU() for _ in range(9))
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(Expertful() for _ in range(3))

    def forward(self, x):
        for layer in self.model.layers:
            x = layer(x)
        return x


class Expertful(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(4))

    def forward(self, x):
        return sum(e(x) for e in self.experts)


def test_outermost_list_of_blocks_with_parameters_wins():
    # 9 activations have no parameters; 4 experts per block outnumber the 3 layers but sit
    # inside them
    model = Nested()
    stack = find_stack(model)
    assert (stack.paths, stack.layers) == (("model.layers",), model.model.layers)
    assert find_stack(model, "model.layers.0.experts").paths == ("model.layers.0.experts",)


def test_llama_layers_found():
    model = LlamaShaped(layers=3, dim=8, heads=2, kv_heads=1, hidden=16, vocab=8)
    stack = find_stack(model)
    assert (stack.name, stack.layers, stack.block_name(2)) == ("layers", model.layers, "layers.2")


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("model.nothing", "does not name a submodule"),
        ("model", "names a Module, not an nn.ModuleList or nn.Sequential"),
        ("acts.0", "names a ReLU"),
    ],
)
def test_layers_path_errors(path, message):
    with pytest.raises(LayerDiscoveryError, match=message):
        find_stack(Nested(), path)


def test_no_list_is_a_clear_error():
    with pytest.raises(LayerDiscoveryError, match=r"Linear has no nn\.ModuleList"):
        find_stack(nn.Linear(2, 2))


def test_remembered_lists_are_found_by_parameter():
    model = LlamaShaped(layers=2, dim=8, heads=2, kv_heads=1, hidden=16, vocab=8)
    assert known_stacks([model.layers[1].q_proj.weight]) == []
    entry = stack_of(model)
    found = known_stacks([model.layers[1].q_proj.weight, model.lm_head.weight])
    assert found == [entry]
    assert (entry.paths, entry.layers, entry.root) == (("layers",), model.layers, model)


def test_candidate_roots_are_the_outermost_modules_of_the_frame():
    model = LlamaShaped(layers=2, dim=8, heads=2, kv_heads=1, hidden=16, vocab=8)
    seen = {}

    def backend(gm, example_inputs):
        seen["roots"] = candidate_roots(gm)
        seen["params"] = [p.param for p in param_placeholders(gm)]
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(torch.randint(0, 8, (1, 3)))
    torch._dynamo.reset()
    assert seen["roots"] == [model]
    assert {id(p) for p in seen["params"]} == {id(p) for p in model.parameters()}


class SequentialStack(nn.Module):
    """timm-style: the blocks in an nn.Sequential called as one module, beside a Sequential
    pipeline of different modules (not a stack)."""

    def __init__(self, layers: int = 6, dim: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim), nn.Linear(dim, dim))
        self.blocks = nn.Sequential(*(nn.Sequential(nn.Linear(dim, dim), nn.GELU())
                                      for _ in range(layers)))  # fmt: skip

    def forward(self, x):
        return self.blocks(self.stem(x))


def test_a_sequential_of_blocks_of_one_class_is_a_stack_and_a_pipeline_is_not():
    model = SequentialStack()
    assert find_stack(model).layers is model.blocks
    assert find_stack(model, "stem").paths == ("stem",)  # named, a Sequential is taken as given


def test_a_sequential_stack_compiles_offloaded_equal_to_inductor_on_every_call():
    import copy

    import offload_compiler

    torch.manual_seed(0)
    model = SequentialStack().eval()
    reference = torch.compile(copy.deepcopy(model))
    options = {"prefetch": {"offload_group_size": 2, "offload_num_in_group": 1}}
    compiled = torch.compile(model, backend="offload", options=options)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(4, 16)
            torch.testing.assert_close(compiled(x), reference(x), rtol=1e-5, atol=1e-5)
    (stack,) = offload_compiler.offloaded_stacks(model)
    assert (stack.layers_path, stack.layers) == ("blocks", (1, 3, 5))


def test_every_stack_is_found_in_registration_order_and_numbered_as_one():
    model = TwoStacks(encoder=3, decoder=2)
    stack = find_stack(model)
    assert (stack.paths, stack.lengths, stack.name) == (
        ("encoder", "decoder"),
        (3, 2),
        "encoder+decoder",
    )
    assert list(stack.layers) == [*model.encoder, *model.decoder]
    assert [stack.block_name(i) for i in (2, 3, 4)] == ["encoder.2", "decoder.0", "decoder.1"]
    assert find_stack(model).layers is stack.layers  # one object: its runtime is found by it


def test_layers_path_names_one_stack_or_several_in_the_order_given():
    model = TwoStacks(encoder=3, decoder=2)
    assert find_stack(model, "decoder").layers is model.decoder
    stack = find_stack(model, ("decoder", "encoder"))
    assert list(stack.layers) == [*model.decoder, *model.encoder]
    with pytest.raises(
        LayerDiscoveryError, match=r"'model\.layers' and 'model\.layers\.0\.experts'"
    ):
        find_stack(Nested(), ("model.layers", "model.layers.0.experts"))


def test_two_stacks_compile_offloaded_equal_to_inductor_on_every_call_and_form_one_ring():
    import copy

    import offload_compiler

    torch.manual_seed(0)
    model = TwoStacks(encoder=3, decoder=3, dim=16, graph_break=True).eval()
    reference = torch.compile(copy.deepcopy(model))
    options = {"prefetch": {"offload_group_size": 2, "offload_num_in_group": 1}}
    compiled = torch.compile(model, backend="offload", options=options)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(4, 16)
            torch.testing.assert_close(compiled(x), reference(x), rtol=1e-5, atol=1e-5)
    (stack,) = offload_compiler.offloaded_stacks(model)
    assert (stack.layers_path, stack.layers) == ("encoder+decoder", (1, 3, 5))
    assert stack.layer_names == ("encoder.1", "decoder.0", "decoder.2")
