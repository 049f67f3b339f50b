"""Which layers and parameters are offloaded, and which slot each layer uses."""

from __future__ import annotations

import pytest

from offload_compiler.config import PrefetchOffloadConfig
from offload_compiler.discovery import find_stack
from offload_compiler.planning import plan_prefetch
from tests.models import LlamaShaped, MLPStack


def _plan(layers: int, group: int, num: int, step: int, params=()):
    model = MLPStack(layers=layers, dim=4)
    config = PrefetchOffloadConfig(
        offload_group_size=group,
        offload_num_in_group=num,
        offload_prefetch_step=step,
        offload_params=frozenset(params),
    )
    return plan_prefetch(find_stack(model, "blocks"), config)


@pytest.mark.parametrize(
    ("layers", "group", "num", "expected"),
    [
        (16, 8, 2, [6, 7, 14, 15]),
        (8, 4, 1, [3, 7]),
        (5, 1, 1, [0, 1, 2, 3, 4]),
        (6, 3, 3, [0, 1, 2, 3, 4, 5]),
    ],
)
def test_group_pattern(layers, group, num, expected):
    assert [layer.index for layer in _plan(layers, group, num, 1).layers] == expected


def test_slots_follow_offloaded_position_not_layer_index():
    plan = _plan(16, 8, 2, 3)
    assert [(layer.index, layer.position, layer.slot) for layer in plan.layers] == [
        (6, 0, 0),
        (7, 1, 1),
        (14, 2, 2),
        (15, 3, 0),
    ]
    assert plan.num_slots == 3


def test_num_slots_never_exceeds_offloaded_layers():
    assert _plan(4, 2, 1, 4).num_slots == 2


@pytest.mark.parametrize(
    ("layers", "step", "expected"),
    [
        (6, 2, {0: 2, 1: 3, 2: 4, 3: 5, 4: 0, 5: 1}),  # (k + step) % n
        (6, 1, {0: 1, 1: 2, 2: 3, 3: 4, 4: 5, 5: 0}),
        # 5 layers, 2 slots (0,1,0,1,0): after layer 3 comes layer 1 of the next forward, after
        # layer 4 layer 0; never a layer of the other slot
        (5, 2, {0: 2, 1: 3, 2: 4, 3: 1, 4: 0}),
        (2, 3, {0: 0, 1: 1}),  # fewer layers than slots: each keeps its own
    ],
)
def test_next_in_slot_is_the_next_user_of_the_same_slot(layers, step, expected):
    plan = _plan(layers, 1, 1, step)
    nxt = {layer.index: plan.next_in_slot(layer).index for layer in plan.layers}
    assert nxt == expected
    for layer in plan.layers:
        assert plan.next_in_slot(layer).slot == layer.slot


def test_offload_params_selects_by_segment():
    plan = _plan(2, 1, 1, 1, params=["fc.weight"])
    assert [layer.params for layer in plan.layers] == [("fc.weight",), ("fc.weight",)]
    assert _plan(2, 1, 1, 1, params=["weight"]).layers[0].params == ("fc.weight",)
    assert _plan(2, 1, 1, 1, params=["fc"]).layers[0].params == ("fc.weight", "fc.bias")


def test_a_layer_without_matching_parameters_is_not_offloaded():
    model = LlamaShaped(layers=2, dim=8, heads=2, kv_heads=1, hidden=16, vocab=8)
    config = PrefetchOffloadConfig(offload_layers=(0, 1), offload_layer_params=((1, {"nope"}),))
    assert [layer.index for layer in plan_prefetch(find_stack(model, "layers"), config).layers] == [
        0
    ]


def test_a_config_that_offloads_nothing_is_an_error_naming_the_numbers():
    # the only group is incomplete: layer 7 does not exist
    with pytest.raises(ValueError, match=r"no layer of blocks \(4 layers\): offload_group_size 8 "):
        _plan(4, 8, 1, 1)
    with pytest.raises(ValueError, match=r"layers \[0, 1, 2, 3\] were chosen, but none of"):
        _plan(4, 1, 1, 1, params=["nothing_like_this"])


def test_llama_layer_params_in_registration_order():
    model = LlamaShaped(layers=2, dim=8, heads=2, kv_heads=1, hidden=16, vocab=8)
    config = PrefetchOffloadConfig(offload_group_size=2, offload_num_in_group=1)
    (layer,) = plan_prefetch(find_stack(model, "layers"), config).layers
    assert layer.index == 1
    assert layer.params[:3] == ("input_norm.weight", "q_proj.weight", "k_proj.weight")
    assert plan_prefetch(find_stack(model, "layers"), config).layer_at(0) is None


def test_explicit_layers_and_a_partial_layer():
    model = MLPStack(layers=6, dim=4)
    config = PrefetchOffloadConfig(
        offload_layers=(1, 3, 4), offload_layer_params=((4, frozenset({"fc.weight"})),)
    )
    plan = plan_prefetch(find_stack(model, "blocks"), config)
    assert [(layer.index, layer.params) for layer in plan.layers] == [
        (1, ("fc.weight", "fc.bias")),
        (3, ("fc.weight", "fc.bias")),
        (4, ("fc.weight",)),
    ]
    assert [layer.slot for layer in plan.layers] == [0, 0, 0]


def test_explicit_layers_beyond_the_model_are_named():
    config = PrefetchOffloadConfig(offload_layers=(1, 6, 9))
    with pytest.raises(ValueError, match=r"names layers \[6, 9\], but the model has 6 layers"):
        plan_prefetch(find_stack(MLPStack(layers=6, dim=4), "blocks"), config)
