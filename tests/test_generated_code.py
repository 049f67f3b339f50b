"""Inductor's generated code keeps the offload ops where the FX pass put them.

The ordering hazard: Inductor may fuse or recompute a pointwise kernel that reads a slot after
the op that starts overwriting it. These tests read the generated code of the very graphs the
backend compiles and check that no line reads slot s between start_prefetch of a layer using s
and that layer's wait_prefetch.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from offload_compiler.config import OffloadConfig
from offload_compiler.discovery import find_stack
from offload_compiler.planning import plan_prefetch
from tests.common import prefetch_options
from tests.graphs import rewrites, unfenced_slot_reads
from tests.models import LlamaShaped, MLPStack


def _generated(model, options, x):
    """The compiled code, the names of its slot inputs and the layer -> slot map."""
    (rewrite,) = rewrites(model, options, x)
    placeholders = rewrite.gm.graph.find_nodes(op="placeholder")
    first_slot = len(placeholders) - len(rewrite.slots)
    slot_args = {}
    for i, node in enumerate(placeholders[first_slot:], start=first_slot):
        match = re.fullmatch(r"offload_slot_r\d+_s(\d+)_(\w+?)(?:_\d+)?", node.name)
        slot_args[f"arg{i}_1"] = (int(match.group(1)), match.group(2))
    plan = plan_prefetch(find_stack(model), OffloadConfig.model_validate(options).prefetch)
    slot_of_layer = {layer.index: layer.slot for layer in plan.layers}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="offload", options=options)
    with torch.no_grad():
        _, (code, *_) = run_and_get_code(compiled, x)
    torch._dynamo.reset()
    return code, slot_args, slot_of_layer


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("step", [1, 2])
def test_mlp_slots_are_not_read_while_being_refilled(step, mode):
    torch.manual_seed(0)
    model = MLPStack(layers=4, dim=16)
    options = {**prefetch_options(1, 1, step, per_param=False), "mode": mode}
    code, slot_args, slot_of_layer = _generated(model, options, torch.randn(2, 16))
    assert code.count("torch.ops.offload.start_prefetch") == 4
    assert code.count("torch.ops.offload.wait_prefetch") == 4
    assert code.count("torch.ops.offload.join_after_forward") == 1
    assert unfenced_slot_reads(code, slot_args, slot_of_layer) == ([], 8)


def test_llama_slots_are_not_read_while_being_refilled():
    torch.manual_seed(0)
    model = LlamaShaped(layers=4, dim=32, heads=4, kv_heads=2, hidden=64, vocab=64)
    code, slot_args, slot_of_layer = _generated(
        model,
        prefetch_options(1, 1, 1, per_param=False),
        torch.randint(0, 64, (1, 8)),
    )
    assert unfenced_slot_reads(code, slot_args, slot_of_layer) == ([], 8)
    # the ops come in layer order: wait(0) start(1) wait(1) start(2) ... start(0) join
    ops = re.findall(r"torch\.ops\.offload\.(\w+)\.default\(\[.*?\], \d+(?:, (\d+))?", code)
    sequence = [(name, int(layer) if layer else None) for name, layer in ops]
    expected = [("wait_prefetch", 0)]
    for layer in range(4):
        if layer:
            expected.append(("wait_prefetch", layer))
        expected.append(("start_prefetch", (layer + 1) % 4))
    assert [s for s in sequence if s[0] != "join_after_forward"] == expected
    assert sequence[-1][0] == "join_after_forward"


def test_the_check_catches_a_read_after_the_refill_starts():
    """The checker itself: a slot read placed after start_prefetch is reported."""
    code = (
        "def call(self, args):\n"
        "    torch.ops.offload.wait_prefetch.default([buf0, buf1], 0, 0)\n"
        "    extern_kernels.mm(buf1, arg5_1, out=buf2)\n"
        "    torch.ops.offload.start_prefetch.default([buf0, buf2], 0, 1)\n"
        "    cpp_fused_add_relu_1(buf2, arg6_1, buf3)\n"
        "    torch.ops.offload.wait_prefetch.default([buf0, buf3], 0, 1)\n"
        "    extern_kernels.mm(buf3, arg5_1, out=buf4)\n"
    )
    slot_args = {"arg5_1": (0, "fc_weight"), "arg6_1": (0, "fc_bias")}
    bad = unfenced_slot_reads(code, slot_args, {0: 0, 1: 0})
    assert bad == (["cpp_fused_add_relu_1(buf2, arg6_1, buf3)"], 3)


def test_per_param_refills_leave_the_other_parameters_readable_but_never_their_own():
    torch.manual_seed(0)
    model = LlamaShaped(layers=4, dim=32, heads=4, kv_heads=2, hidden=64, vocab=64)
    options = prefetch_options(1, 1, 1, per_param=True)
    code, slot_args, slot_of_layer = _generated(model, options, torch.randint(0, 64, (1, 8)))
    bad, seen = unfenced_slot_reads(code, slot_args, slot_of_layer)
    assert bad == []
    assert seen == 4 * 9 * 2  # a wait and a start per layer and parameter
