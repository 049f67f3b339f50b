"""Weights changed between calls: the next call computes with the new values.

Each forward ends by prefetching the first offloaded layers into their slots for the next call,
so a change of those layers' weights after a call must refresh their slots. On CPU a prefetch
is a synchronous copy, so a slot left stale gives the old weights' numbers on the first call
after the change: every test compares that very call with an eager model holding the new
weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import offload_compiler
from tests.common import prefetch_options
from tests.models import LlamaShaped, MLPStack


def _options(step: int, **prefetch) -> dict:
    options = prefetch_options(1, 1, step)
    options["prefetch"].update(prefetch)
    return options


def _pair(seed_a: int = 0, seed_b: int = 1) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed_a)
    model = MLPStack(layers=4, dim=16)
    torch.manual_seed(seed_b)
    other = MLPStack(layers=4, dim=16)
    return model.requires_grad_(False), other.requires_grad_(False)


def _load_in_place(model: nn.Module, other: nn.Module) -> None:
    model.load_state_dict(other.state_dict())


def _copy_through_parameter(model: nn.Module, other: nn.Module) -> None:
    with torch.no_grad():
        for p, q in zip(model.parameters(), other.parameters(), strict=True):
            p.copy_(q)


def _copy_through_data(model: nn.Module, other: nn.Module) -> None:
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        p.data.copy_(q)


def _add_through_data(model: nn.Module, other: nn.Module) -> None:
    """A LoRA merge's pattern: ``weight.data += delta``."""
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        p.data += q - p.detach()


def _rebind_data(model: nn.Module, other: nn.Module) -> None:
    """``param.data = new``, as a safe LoRA merge or ``vector_to_parameters`` does."""
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        p.data = q.detach().clone()


def _assign(model: nn.Module, other: nn.Module) -> None:
    """New Parameter objects (``load_state_dict(assign=True)``)."""
    model.load_state_dict(copy.deepcopy(other.state_dict()), assign=True)


CHANGES = {
    "load_state_dict": _load_in_place,
    "param.copy_": _copy_through_parameter,
    "param.data.copy_": _copy_through_data,
    "param.data +=": _add_through_data,
    "param.data =": _rebind_data,
    "load_state_dict(assign=True)": _assign,
}


@pytest.mark.parametrize("capturable", [False, True], ids=["default", "capturable"])
@pytest.mark.parametrize("step", [1, 2])
@pytest.mark.parametrize("change", list(CHANGES))
def test_first_call_after_a_change_uses_the_new_weights(change, step, capturable):
    model, other = _pair()
    compiled = torch.compile(
        model, backend="offload", options=_options(step, offload_capturable=capturable)
    )
    x = torch.randn(3, 16)
    with torch.no_grad():
        for _ in range(3):
            assert torch.allclose(compiled(x), model(x), atol=1e-5)
        expected = other(x)
        assert not torch.allclose(expected, model(x), atol=1e-3)  # the change is visible
        CHANGES[change](model, other)
        assert torch.allclose(model(x), expected, atol=1e-5)  # eager follows the change
        for call in range(2):
            diff = (compiled(x) - expected).abs().max().item()
            assert diff <= 1e-5, f"call {call} after {change}: max |diff| {diff}"


def test_llama_in_default_and_reduce_overhead_modes_on_cpu():
    torch.manual_seed(0)
    model = LlamaShaped(layers=4, dim=32, heads=4, kv_heads=2, hidden=64, vocab=64)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    compiled = torch.compile(model, backend="offload", options=prefetch_options(2, 1, 1))
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        for _ in range(3):
            compiled(ids)
        model.load_state_dict(other.state_dict())
        assert torch.allclose(compiled(ids), other(ids), atol=1e-5)


def test_reload_weights_refreshes_slots_after_writes_the_backend_cannot_see():
    model, other = _pair()
    compiled = torch.compile(model, backend="offload", options=_options(1))
    x = torch.randn(3, 16)
    with torch.no_grad():
        for _ in range(2):
            compiled(x)
        for p, q in zip(model.parameters(), other.parameters(), strict=True):
            # a write through the storage itself: no version counter sees it
            p.untyped_storage().copy_(q.detach().clone().untyped_storage())
        offload_compiler.reload_weights(model)
        assert torch.allclose(compiled(x), other(x), atol=1e-5)


def test_rebinding_to_another_layout_fails_naming_the_parameter():
    model, _ = _pair()
    compiled = torch.compile(model, backend="offload", options=_options(1))
    x = torch.randn(3, 16)
    with torch.no_grad():
        compiled(x)
        model.blocks[0].fc.weight.data = torch.zeros(16, 16).t()  # other strides
        with pytest.raises(Exception, match=r"blocks\.0\.fc\.weight .*strides"):
            compiled(x)


def test_offloading_inside_the_backend_costs_no_recompile():
    """The backend makes the parameters `OffloadedParameter`s while Dynamo compiles; the guards
    it then builds see that class, so later calls reuse the graph."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, _ = _pair()
    compiled = torch.compile(model, backend="offload", options=_options(1))
    with torch.no_grad():
        for _ in range(4):
            compiled(torch.randn(3, 16))
    assert type(model.blocks[0].fc.weight).__name__ == "OffloadedParameter"
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    torch._dynamo.reset()


# --- on the GPU -------------------------------------------------------------------------------


def cuda(test):
    """Mark ``test`` as a GPU test that skips where there is no GPU."""
    needs = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    return pytest.mark.cuda(needs(test))


VOCAB = 512
GPU_SCHEDULES = {
    "default": {},
    "reduce-overhead": {"mode": "reduce-overhead"},
    "reduce-overhead, copies captured": {
        "mode": "reduce-overhead",
        "prefetch": {"offload_host_copies": False},
    },
    "capturable": {"prefetch": {"offload_capturable": True}},
}
GPU_CHANGES = [
    "load_state_dict",
    "param.data.copy_",
    "param.data =",
    "load_state_dict(assign=True)",
]


def _gpu_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = LlamaShaped(layers=4, dim=256, heads=8, kv_heads=4, hidden=512, vocab=VOCAB)
    return model.cuda().requires_grad_(False)


def _with(options: dict, schedule: dict) -> dict:
    options = copy.deepcopy(options)
    options["prefetch"].update(schedule.get("prefetch", {}))
    options.update({k: v for k, v in schedule.items() if k != "prefetch"})
    return options


@cuda
@pytest.mark.parametrize("schedule", list(GPU_SCHEDULES))
def test_gpu_first_call_after_each_change_uses_the_new_weights(schedule):
    """Every layer offloaded, one slot (#27's case), in every CUDA schedule: one compiled model
    goes through each way of changing weights in turn, to alternating weights, and the first
    call after each change (a replay, where the schedule records CUDA graphs) uses them."""
    model, others = _gpu_model(0), [_gpu_model(1), _gpu_model(2)]
    options = _with(prefetch_options(1, 1, 1), GPU_SCHEDULES[schedule])
    compiled = torch.compile(model, backend="offload", options=options)
    ids = torch.randint(0, VOCAB, (1, 16), device="cuda")
    with torch.no_grad():
        for _ in range(4):  # compile, warm up, record, replay
            compiled(ids)
        for turn, change in enumerate(GPU_CHANGES):
            other = others[turn % 2]
            expected = other(ids)
            CHANGES[change](model, other)
            for call in range(2):
                diff = (compiled(ids).clone() - expected).abs().max().item()
                assert diff <= 1e-3, f"call {call} after {change}: max |diff| {diff}"


@cuda
def test_gpu_hand_captured_graph_replays_new_weights_after_reload_weights():
    """Replays of a graph captured by hand run no Python: the capture warns, naming the call
    that makes the next replay read changed weights."""
    model, other = _gpu_model(0), _gpu_model(1)
    options = prefetch_options(1, 1, 1)
    options["prefetch"]["offload_capturable"] = True
    compiled = torch.compile(model, backend="offload", options=options)
    ids = torch.randint(0, VOCAB, (1, 16), device="cuda")
    with torch.no_grad():
        for _ in range(3):
            compiled(ids)
        graph = torch.cuda.CUDAGraph()
        with pytest.warns(UserWarning, match="reload_weights"), torch.cuda.graph(graph):
            out = compiled(ids)
        graph.replay()
        torch.testing.assert_close(out.clone(), model(ids), rtol=1e-4, atol=1e-4)
        model.load_state_dict(other.state_dict())
        offload_compiler.reload_weights(model)
        graph.replay()
        torch.testing.assert_close(out.clone(), other(ids), rtol=1e-4, atol=1e-4)


def test_a_parameter_subclass_is_offloaded_with_a_warning_naming_reload_weights():
    """Its ``.data`` keeps its own class's meaning, so writes through it go unseen: the
    offloading says so, naming the call that covers them."""
    from offload_compiler.host_memory import offload_parameters

    class Tagged(nn.Parameter):
        pass

    param = Tagged(torch.randn(4, 4), requires_grad=False)
    with pytest.warns(UserWarning, match=r"Tagged.*reload_weights"):
        offload_parameters([param], torch.device("cpu"))
    assert type(param) is Tagged
