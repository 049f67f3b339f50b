"""The stall report: every wait of the measured calls timed per offloaded layer, forwards
counted, the copy bound and prediction given; nothing timed outside the block."""

from __future__ import annotations

import time

import pytest
import torch

import offload_compiler
from offload_compiler.runtime.registry import runtimes_of
from tests.common import prefetch_options
from tests.models import MLPStack


def _compiled(per_param: bool = False):
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = MLPStack(layers=4, dim=16).eval()
    options = prefetch_options(2, 1, 1, per_param=per_param)
    compiled = torch.compile(model, backend="offload", options=options)
    with torch.no_grad():
        compiled(torch.randn(2, 16))
    return model, compiled


def test_each_wait_of_the_measured_calls_is_timed_per_layer():
    model, compiled = _compiled()
    (runtime,) = runtimes_of(model)
    slow = runtime.plan.layers[1]  # blocks.3: its wait takes 20 ms longer
    wait = runtime._order.wait

    def slow_wait(layer, names):
        if layer is slow:
            time.sleep(0.02)
        wait(layer, names)

    runtime._order.wait = slow_wait
    with torch.no_grad():
        with offload_compiler.measure_stalls(model, tokens=2) as stalls:
            for _ in range(3):
                compiled(torch.randn(2, 16))
        compiled(torch.randn(2, 16))  # after the block: not timed
    report = stalls.report()
    (stack,) = report.stacks
    assert stack.forwards == 3 and stack.forward_ms is not None
    assert [(layer.name, layer.waits) for layer in stack.layers] == [
        ("blocks.1", 3),
        ("blocks.3", 3),
    ]
    fast, slowed = stack.layers
    assert slowed.total_ms >= 60 and slowed.max_ms >= 20
    assert fast.max_ms < 20
    assert stack.forward_ms >= 20  # a forward includes its slow wait
    assert stack.copy_ms > 0 and stack.predicted_ms >= stack.copy_ms
    text = str(report)
    assert "offload stalls of blocks: 3 forwards" in text and "| blocks.3 | 3 |" in text
    assert runtime.timer is None


def test_per_parameter_waits_count_one_forward_each():
    model, compiled = _compiled(per_param=True)
    with torch.no_grad(), offload_compiler.measure_stalls(model) as stalls:
        for _ in range(2):
            compiled(torch.randn(2, 16))
    (stack,) = stalls.report().stacks
    assert stack.forwards == 2 and stack.predicted_ms is None
    assert [layer.waits for layer in stack.layers] == [4, 4]  # weight and bias, twice


def test_a_model_never_compiled_has_no_stalls_to_measure():
    model = MLPStack(layers=2, dim=4)
    with (
        pytest.raises(ValueError, match="no offloaded layers"),
        offload_compiler.measure_stalls(model),
    ):
        pass


@pytest.mark.cuda
def test_gpu_stall_report_times_waits_with_events_and_skips_cuda_graphs():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    for mode, timed in (("default", True), ("reduce-overhead", False)):
        torch._dynamo.reset()
        model = MLPStack(layers=4, dim=1024).to(torch.bfloat16)
        options = {**prefetch_options(2, 1, 1), "mode": mode}
        offload_compiler.place_model(model, options, "cuda")
        compiled = torch.compile(model, backend="offload", options=options)
        x = torch.randn(8, 1024, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            for _ in range(3):
                compiled(x)
            with offload_compiler.measure_stalls(model) as stalls:
                for _ in range(5):
                    compiled(x)
        (stack,) = stalls.report().stacks
        if timed:
            assert stack.forwards == 5 and stack.forward_ms > 0
            assert all(layer.waits == 10 and layer.total_ms >= 0 for layer in stack.layers)
        else:
            assert stack.forwards == 0 and stack.untimed_waits == 0
        torch._dynamo.reset()
