"""Recompiles reuse one runtime: the same host copies and slot pool, and correct numbers."""

from __future__ import annotations

import pytest
import torch

from offload_compiler.runtime import registry as runtime_module
from tests.models import LlamaShaped, MLPStack, clone_model

OPTIONS = {
    "prefetch": {"offload_group_size": 1, "offload_num_in_group": 1, "offload_prefetch_step": 2}
}


def _runtime_of(layers):
    return runtime_module._BY_STACK[layers]


@pytest.mark.parametrize("dynamic", [True, None])  # None: automatic dynamic after a 2nd shape
def test_new_shapes_reuse_host_copies_and_slots(dynamic):
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = LlamaShaped(layers=4, dim=32, heads=4, kv_heads=2, hidden=64, vocab=64)
    reference = clone_model(model)
    compiled = torch.compile(model, backend="offload", options=OPTIONS, dynamic=dynamic)
    with torch.no_grad():
        compiled(torch.randint(0, 64, (1, 5)))
        count = len(runtime_module._RUNTIMES)
        runtime = _runtime_of(model.layers)
        slots = {k: t.data_ptr() for k, t in runtime.slot_tensors(0).items()}
        pool_bytes = runtime.pool.nbytes
        for length in (7, 11, 3):
            ids = torch.randint(0, 64, (2, length))
            torch.testing.assert_close(compiled(ids), reference(ids), rtol=1e-5, atol=1e-5)
    assert len(runtime_module._RUNTIMES) == count
    assert _runtime_of(model.layers) is runtime
    assert {k: t.data_ptr() for k, t in runtime.slot_tensors(0).items()} == slots
    assert runtime.pool.nbytes == pool_bytes
    torch._dynamo.reset()


def test_reset_and_recompile_leave_the_model_intact():
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = MLPStack(layers=4, dim=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 16)
    with torch.no_grad():
        first = torch.compile(model, backend="offload", options=OPTIONS)(x)
        torch._dynamo.reset()
        second = torch.compile(model, backend="offload", options=OPTIONS)(x)
        torch._dynamo.reset()
        eager = model(x)
    torch.testing.assert_close(first, second)
    torch.testing.assert_close(first, eager, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_two_models_have_their_own_runtime_and_both_are_right():
    torch.manual_seed(0)
    torch._dynamo.reset()
    a, b = MLPStack(layers=4, dim=16), MLPStack(layers=6, dim=16)
    ref_a, ref_b = torch.compile(clone_model(a)), torch.compile(clone_model(b))
    other = {**OPTIONS, "prefetch": {**OPTIONS["prefetch"], "offload_prefetch_step": 1}}
    ca = torch.compile(a, backend="offload", options=OPTIONS)
    cb = torch.compile(b, backend="offload", options=other)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(3, 16)
            torch.testing.assert_close(ca(x), ref_a(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(cb(x), ref_b(x), rtol=1e-5, atol=1e-5)
    ra, rb = _runtime_of(a.blocks), _runtime_of(b.blocks)
    assert ra is not rb and ra.id != rb.id
    assert (ra.plan.num_slots, rb.plan.num_slots) == (2, 1)
    torch._dynamo.reset()
