"""The UVA backend: which parameters it keeps in host memory, the fallback rewrite, numerics."""

from __future__ import annotations

import logging
import warnings

import expecttest
import pytest
import torch

import offload_compiler
from offload_compiler import OffloadConfig
from offload_compiler.config import UVAOffloadConfig
from offload_compiler.host_memory import host_copy
from offload_compiler.planning import plan_uva
from tests.graphs import rewrites, summary
from tests.models import LlamaShaped, MLPStack, clone_model


def _gb(nbytes: int) -> float:
    return nbytes / 2**30


def test_plan_takes_parameters_in_model_order_until_the_budget():
    model = MLPStack(layers=4, dim=16)  # proj_in, then blocks.0..3: fc.weight 1024 B, bias 64 B
    names = [name for name, _ in model.named_parameters()]
    plan = plan_uva(model, UVAOffloadConfig(cpu_offload_gb=_gb(1024 + 64 + 1)))
    # the budget is crossed by the third parameter, which still goes (as in vLLM)
    assert plan.params == tuple(names[:3]) and plan.nbytes == 1024 + 64 + 1024


def test_plan_splits_a_module_by_parameter():
    model = MLPStack(layers=2, dim=16)
    plan = plan_uva(model, UVAOffloadConfig(cpu_offload_gb=_gb(1024)))
    assert plan.params == ("proj_in.weight",)  # the bias of proj_in stays


def test_plan_with_segments_skips_what_does_not_match():
    model = MLPStack(layers=3, dim=16)
    config = UVAOffloadConfig(cpu_offload_gb=1.0, cpu_offload_params=frozenset({"fc.weight"}))
    assert plan_uva(model, config).params == tuple(f"blocks.{i}.fc.weight" for i in range(3))
    none = UVAOffloadConfig(cpu_offload_gb=1.0, cpu_offload_params=frozenset({"fc.w"}))
    assert plan_uva(model, none).params == ()


def test_auto_selects_uva_by_budget_and_prefetch_when_both_are_set():
    assert OffloadConfig.model_validate({"uva": {"cpu_offload_gb": 1}}).selected_backend == "uva"
    with pytest.warns(UserWarning, match="Prefetch backend will be selected"):
        both = OffloadConfig.model_validate(
            {"uva": {"cpu_offload_gb": 1}, "prefetch": {"offload_group_size": 2}}
        )
    assert both.selected_backend == "prefetch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert OffloadConfig().selected_backend is None


class TestFallbackGraph(expecttest.TestCase):
    def test_each_use_reads_a_fresh_device_copy(self):
        torch.manual_seed(0)
        model = MLPStack(layers=2, dim=8)
        options = {"uva": {"cpu_offload_gb": _gb(3 * 256 + 2 * 32), "cpu_offload_params": []}}
        (rewrite,) = rewrites(model, options, torch.randn(2, 8))
        self.assertExpectedInline(
            summary(rewrite.gm),
            """\
fetch_param_default = fetch_param(after=l_x, index=0)
fetch_param_default_1 = fetch_param(after=l_x, index=1)
x = linear(l_x, fetch_param_default, fetch_param_default_1)
_log_api_usage_once = _log_api_usage_once('python.nn_module')
fetch_param_default_2 = fetch_param(after=x, index=2)
fetch_param_default_3 = fetch_param(after=x, index=3)
linear_1 = linear(x, fetch_param_default_2, fetch_param_default_3)
relu = relu(linear_1)
x_1 = add(relu, x)
fetch_param_default_4 = fetch_param(after=x_1, index=4)
linear_2 = linear(x_1, fetch_param_default_4, blocks.1.fc.bias)
relu_1 = relu(linear_2)
x_2 = add(relu_1, x_1)
return [x_2]""",
        )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestInPlaceGraph(expecttest.TestCase):
    def test_reads_stay_parameter_reads_of_host_memory(self):
        """Zero copy: the graph is not rewritten (no fetch, no prefetch op); the parameters it
        reads are device views whose pointer is the pinned host copy's."""
        torch.manual_seed(0)
        model = MLPStack(layers=2, dim=8).cuda()
        options = {"uva": {"cpu_offload_gb": _gb(3 * 256 + 2 * 32), "cpu_offload_params": []}}
        (rewrite,) = rewrites(model, options, torch.randn(2, 8, device="cuda"))
        self.assertExpectedInline(
            summary(rewrite.gm),
            """\
x = linear(l_x, proj_in.weight, proj_in.bias)
_log_api_usage_once = _log_api_usage_once('python.nn_module')
linear_1 = linear(x, blocks.0.fc.weight, blocks.0.fc.bias)
relu = relu(linear_1)
x_1 = add(relu, x)
linear_2 = linear(x_1, blocks.1.fc.weight, blocks.1.fc.bias)
relu_1 = relu(linear_2)
x_2 = add(relu_1, x_1)
return [x_2]""",
        )
        offloaded = [p for p in model.parameters() if host_copy(p) is not None]
        assert len(offloaded) == 5  # the same five parameters the fallback form fetches
        for param in offloaded:
            assert param.device.type == "cuda" and host_copy(param).is_pinned()
            assert param.data_ptr() == host_copy(param).data_ptr()


def test_place_model_offloads_the_plan_before_compiling():
    torch.manual_seed(0)
    model = LlamaShaped(layers=4, dim=32, heads=4, kv_heads=2, hidden=64, vocab=64)
    reference = torch.compile(clone_model(model))
    options = {"uva": {"cpu_offload_gb": _gb(30_000)}}
    offload_compiler.place_model(model, options, "cpu")
    chosen = plan_uva(model, UVAOffloadConfig(cpu_offload_gb=_gb(30_000))).params
    params = dict(model.named_parameters())
    assert chosen and all(host_copy(params[name]) is not None for name in chosen)
    assert host_copy(model.lm_head.weight) is None  # past the budget: stays where it is
    compiled = torch.compile(model, backend="offload", options=options)
    with torch.no_grad():
        for _ in range(2):
            ids = torch.randint(0, 64, (2, 8))
            torch.testing.assert_close(compiled(ids), reference(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("segments", [[], ["q_proj", "down_proj"]])
def test_fallback_equals_inductor_on_every_call(segments, caplog):
    torch.manual_seed(0)
    model = LlamaShaped(layers=4, dim=32, heads=4, kv_heads=2, hidden=64, vocab=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = torch.compile(clone_model(model))
    options = {"uva": {"cpu_offload_gb": _gb(60_000), "cpu_offload_params": segments}}
    compiled = torch.compile(model, backend="offload", options=options)
    with caplog.at_level(logging.INFO, logger="offload_compiler"), torch.no_grad():
        for _ in range(3):
            ids = torch.randint(0, 64, (2, 8))
            torch.testing.assert_close(compiled(ids), reference(ids), rtol=1e-5, atol=1e-5)
    (line,) = [r.getMessage() for r in caplog.records if "offload (uva)" in r.getMessage()]
    assert "copied to the device before use" in line
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    offloaded = model.layers[0].q_proj.weight
    assert host_copy(offloaded) is not None
    assert (host_copy(model.embed_tokens.weight) is None) == bool(segments)
