"""The prefetch runtime on CPU: synchronous copies into slots, slot ownership, errors."""

from __future__ import annotations

import pytest
import torch

from offload_compiler.config import PrefetchOffloadConfig
from offload_compiler.discovery import find_stack
from offload_compiler.planning import plan_prefetch
from offload_compiler.runtime.registry import get_runtime, runtime_for
from tests.common import cpu_schedule
from tests.models import MLPStack


def _runtime(step: int = 1, layers: int = 3):
    model = MLPStack(layers=layers, dim=4)
    config = PrefetchOffloadConfig(
        offload_group_size=1, offload_num_in_group=1, offload_prefetch_step=step
    )
    plan = plan_prefetch(find_stack(model, "blocks"), config)
    return model, runtime_for(model.blocks, plan, cpu_schedule(config))


def test_first_layers_are_in_their_slots_from_the_start():
    model, runtime = _runtime(step=2)
    for layer in (0, 1):
        assert torch.equal(runtime.slot_tensors(layer)["fc.weight"], model.blocks[layer].fc.weight)


def test_start_copies_the_layer_into_its_shared_slot():
    model, runtime = _runtime(step=1)
    slot = runtime.slot_tensors(0)["fc.weight"]
    assert slot is runtime.slot_tensors(2)["fc.weight"]  # one slot for all layers
    runtime.start(2)
    assert torch.equal(slot, model.blocks[2].fc.weight)


def test_wait_refills_a_slot_that_holds_another_layer():
    model, runtime = _runtime(step=1)
    runtime.start(1)  # slot 0 now holds layer 1
    runtime.wait(0)  # a forward that skipped layers: layer 0 must still read its own weights
    assert torch.equal(runtime.slot_tensors(0)["fc.bias"], model.blocks[0].fc.bias)


def test_same_layers_reuse_their_runtime_and_a_new_config_is_refused():
    model, runtime = _runtime()
    plan = runtime.plan
    assert runtime_for(model.blocks, plan, runtime.schedule) is runtime
    with pytest.raises(ValueError, match="already offloaded with another configuration"):
        runtime_for(model.blocks, plan, cpu_schedule(poison_slots=True))
    assert get_runtime(runtime.id) is runtime


def test_unknown_runtime_id_is_explained():
    with pytest.raises(RuntimeError, match="does not exist in this process"):
        get_runtime(10_000)


def test_not_offloaded_layer_is_an_error():
    model = MLPStack(layers=4, dim=4)
    config = PrefetchOffloadConfig(offload_group_size=2, offload_num_in_group=1)
    plan = plan_prefetch(find_stack(model, "blocks"), config)
    runtime = runtime_for(model.blocks, plan, cpu_schedule(config))
    with pytest.raises(RuntimeError, match="layer 0 of blocks is not offloaded"):
        runtime.wait(0)


def test_dropping_a_compiled_model_frees_its_runtime():
    """The registry and the runtime hold the model weakly: once the model and its compiled
    callable are dropped, Dynamo drops the graphs that guard its parameters, and with them the
    runtime, its slots and its host copies."""
    import gc
    import weakref

    from offload_compiler.runtime import registry

    model = MLPStack(layers=4, dim=16)
    compiled = torch.compile(
        model, backend="offload", options={"prefetch": {"offload_group_size": 2}}
    )
    with torch.no_grad():
        compiled(torch.randn(2, 16))
    runtime = registry._BY_STACK[model.blocks]
    freed = weakref.ref(runtime)
    slot = weakref.ref(runtime.slot_tensors(1)["fc.weight"])
    runtime_id = runtime.id
    del model, compiled, runtime
    for _ in range(2):  # Dynamo's cache entries first, then the runtime's own cycles
        gc.collect()
    assert freed() is None and slot() is None
    with pytest.raises(RuntimeError, match="its model was dropped"):
        get_runtime(runtime_id)
