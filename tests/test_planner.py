"""The planner: a budget in, the placement that offloads the fewest bytes within it out (CPU)."""

from __future__ import annotations

import pytest
import torch

from offload_compiler.budget import to_bytes
from offload_compiler.costs import estimate_workspace
from offload_compiler.planner import BudgetError, Costs, plan, spread
from tests.models import LlamaShaped

COSTS = Costs(h2d_gbps=50.0, tflops=400.0, hbm_gbps=3000.0, source="given")
SIZES = {"layers": 8, "dim": 64, "heads": 4, "kv_heads": 2, "hidden": 128, "vocab": 64}


def _model() -> LlamaShaped:
    torch.manual_seed(0)
    return LlamaShaped(**SIZES).eval()


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _plan(model, budget, **kwargs):
    return plan(model, budget, (1, 16), costs=COSTS, workspace=1000, device="cpu", **kwargs)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(123, 123), ("10GiB", 10 * 2**30), ("1.5 GB", 1_500_000_000), ("512mib", 2**29), (0.5, 500)],
)
def test_budgets_in_bytes_units_and_fractions(value, expected):
    assert to_bytes(value, device_total=1000) == expected


@pytest.mark.parametrize("value", ["10 parsecs", "GiB", -1, 1.5, 0.0, True])
def test_a_malformed_budget_is_named(value):
    with pytest.raises(ValueError, match="memory amount"):
        to_bytes(value, device_total=1000)


def test_spread_takes_the_last_layer_and_spaces_the_rest_evenly():
    assert spread(4, 8) == [1, 3, 5, 7]
    assert spread(3, 32) == [10, 21, 31]
    assert spread(8, 8) == list(range(8))


def test_the_plan_fits_and_offloads_at_most_one_parameter_more_than_it_must():
    model = _model()
    total = _bytes(model.parameters())
    largest = max(p.nbytes for p in model.layers[0].parameters())
    for fraction in (0.9, 0.7, 0.5, 0.3):
        planned = _plan(model, int(total * fraction))
        assert planned.memory.total <= planned.budget
        offloaded = planned.config.prefetch.offload_layers
        assert offloaded and offloaded[-1] == SIZES["layers"] - 1
        # keeping one more of its largest parameters resident would not fit
        assert planned.budget - planned.memory.total < largest


def test_the_same_inputs_give_the_same_plan_and_hash():
    model = _model()
    budget = int(_bytes(model.parameters()) * 0.6)
    first, second = _plan(model, budget), _plan(model, budget)
    assert first.config == second.config
    assert first.config.compute_hash() == second.config.compute_hash()
    smaller = budget - _bytes(model.layers[0].parameters())
    assert _plan(model, smaller).config.compute_hash() != first.config.compute_hash()


def test_a_budget_below_the_minimum_names_every_term():
    model = _model()
    message = r"budget 1000 B < minimum .* KiB \(resident .* KiB \+ slots "
    with pytest.raises(BudgetError, match=message):
        _plan(model, 1000, reserve=0)


def test_a_reserve_moves_more_layers_off_the_device():
    model = _model()
    budget = int(_bytes(model.parameters()) * 0.8)
    without = _plan(model, budget)
    with_reserve = _plan(model, budget, reserve=_bytes(model.layers[0].parameters()) * 2)
    assert len(with_reserve.config.prefetch.offload_layers) > len(
        without.config.prefetch.offload_layers
    )


def test_the_planned_config_compiles_and_equals_inductor_on_every_call():
    model = _model()
    planned = _plan(model, int(_bytes(model.parameters()) * 0.6))
    assert planned.config.prefetch.offload_layer_params  # a partial layer is exercised
    reference = torch.compile(_model())
    compiled = torch.compile(model, backend="offload", options=planned.config)
    with torch.no_grad():
        for _ in range(3):
            ids = torch.randint(0, SIZES["vocab"], (2, 8))
            torch.testing.assert_close(compiled(ids), reference(ids), rtol=1e-5, atol=1e-5)
    table = str(planned)
    assert "| tokens | compute ms | copies ms | predicted ms |" in table
    assert " left" in table and "offload plan for a budget of " in table


def test_the_workspace_estimate_grows_with_tokens_and_bounds_the_logits():
    model = _model()
    small, large = estimate_workspace(model, 16), estimate_workspace(model, 256)
    assert large > small
    assert large >= 256 * SIZES["vocab"] * 4  # the logits alone


def test_a_budget_given_as_an_option_is_planned_once_for_placement_and_compile(monkeypatch):
    import offload_compiler
    from offload_compiler import costs

    monkeypatch.setattr(costs, "machine_costs", lambda device: COSTS)
    model = _model()
    budget = int(_bytes(model.parameters()) * 0.6)
    options = {"gpu_memory_budget": budget, "plan_tokens": (1, 8)}
    expected = plan(model, budget, (1, 8), device="cpu", costs=COSTS).config
    offload_compiler.place_model(model, options, "cpu")
    compiled = torch.compile(model, backend="offload", options=options)
    reference = torch.compile(_model())
    with torch.no_grad():
        for _ in range(2):
            ids = torch.randint(0, SIZES["vocab"], (1, 8))
            torch.testing.assert_close(compiled(ids), reference(ids), rtol=1e-5, atol=1e-5)
    (stack,) = offload_compiler.offloaded_stacks(model)
    assert stack.layers == expected.prefetch.offload_layers


def test_a_budget_with_a_layer_choice_of_its_own_is_refused():
    from pydantic import ValidationError

    from offload_compiler import OffloadConfig

    with pytest.raises(ValidationError, match="gpu_memory_budget lets the planner choose"):
        OffloadConfig.model_validate(
            {"gpu_memory_budget": "1GiB", "prefetch": {"offload_group_size": 2}}
        )
