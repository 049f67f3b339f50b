"""The custom ops: registered, declared mutating, dispatching to the runtime."""

from __future__ import annotations

import torch

from offload_compiler import ops
from offload_compiler.config import PrefetchOffloadConfig
from offload_compiler.discovery import find_stack
from offload_compiler.planning import plan_prefetch
from offload_compiler.runtime.registry import runtime_for
from tests.common import cpu_schedule
from tests.models import MLPStack


def test_schemas_declare_the_anchor_mutation_and_return_nothing():
    for op in (ops.WAIT_PREFETCH, ops.START_PREFETCH, ops.JOIN_AFTER_FORWARD):
        schema = op._schema
        assert schema.returns == []
        (anchors, *_) = schema.arguments
        assert anchors.name == "anchors" and anchors.alias_info.is_write
    assert str(ops.WAIT_PREFETCH._schema) == (
        "offload::wait_prefetch(Tensor(a0!)[] anchors, SymInt runtime_id, SymInt layer, "
        "str? param=None) -> ()"
    )


def test_ops_drive_the_runtime_and_leave_anchors_unchanged():
    model = MLPStack(layers=2, dim=4)
    config = PrefetchOffloadConfig(offload_group_size=1, offload_num_in_group=1)
    plan = plan_prefetch(find_stack(model, "blocks"), config)
    runtime = runtime_for(model.blocks, plan, cpu_schedule(config))
    anchor = torch.randn(3)
    before = anchor.clone()
    ops.WAIT_PREFETCH([anchor], runtime.id, 0)
    ops.START_PREFETCH([anchor], runtime.id, 1)
    assert torch.equal(runtime.slot_tensors(1)["fc.weight"], model.blocks[1].fc.weight)
    ops.JOIN_AFTER_FORWARD([anchor], runtime.id, True)
    assert torch.equal(anchor, before)


def test_fake_tensors_pass_through():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        anchor = torch.empty(4)
        assert ops.WAIT_PREFETCH([anchor], 0, 0) is None
