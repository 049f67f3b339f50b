"""The FX rewrite's graph structure, asserted with expecttest on small models."""

from __future__ import annotations

import expecttest
import pytest
import torch
from torch._dynamo.exc import BackendCompilerFailed

from offload_compiler import ops
from tests.common import prefetch_options
from tests.graphs import rewrites, summary
from tests.models import LlamaShaped, MLPStack, TwoStacks


def _mlp(layers: int = 4, **kw) -> tuple[MLPStack, torch.Tensor]:
    torch.manual_seed(0)
    return MLPStack(layers=layers, dim=8, **kw), torch.randn(2, 8)


class TestGraphStructure(expecttest.TestCase):
    def test_prefetch_step_1_one_slot_shared_by_every_layer(self):
        model, x = _mlp(layers=3)
        (rewrite,) = rewrites(model, prefetch_options(1, 1, 1, per_param=False), x)
        self.assertExpectedInline(
            summary(rewrite.gm),
            """\
slot slot_s0_fc_weight
slot slot_s0_fc_bias
empty = empty([0])
x = linear(l_x, proj_in.weight, proj_in.bias)
_log_api_usage_once = _log_api_usage_once('python.nn_module')
wait_prefetch(layer=0, anchors=[empty, x])
linear_1 = linear(x, slot_s0_fc_weight, slot_s0_fc_bias)
start_prefetch(layer=1, anchors=[empty, linear_1])
relu = relu(linear_1)
x_1 = add(relu, x)
wait_prefetch(layer=1, anchors=[empty, x_1])
linear_2 = linear(x_1, slot_s0_fc_weight, slot_s0_fc_bias)
start_prefetch(layer=2, anchors=[empty, linear_2])
relu_1 = relu(linear_2)
x_2 = add(relu_1, x_1)
wait_prefetch(layer=2, anchors=[empty, x_2])
linear_3 = linear(x_2, slot_s0_fc_weight, slot_s0_fc_bias)
start_prefetch(layer=0, anchors=[empty, linear_3])
relu_2 = relu(linear_3)
x_3 = add(relu_2, x_2)
join_after_forward(rejoin=False, anchors=[empty])
return [x_3, empty]""",
        )

    def test_prefetch_step_2_alternates_two_slots(self):
        model, x = _mlp(layers=4)
        (rewrite,) = rewrites(model, prefetch_options(1, 1, 2, per_param=False), x)
        self.assertExpectedInline(
            summary(rewrite.gm),
            """\
slot slot_s0_fc_weight
slot slot_s0_fc_bias
slot slot_s1_fc_weight
slot slot_s1_fc_bias
empty = empty([0])
x = linear(l_x, proj_in.weight, proj_in.bias)
_log_api_usage_once = _log_api_usage_once('python.nn_module')
wait_prefetch(layer=0, anchors=[empty, x])
linear_1 = linear(x, slot_s0_fc_weight, slot_s0_fc_bias)
start_prefetch(layer=2, anchors=[empty, linear_1])
relu = relu(linear_1)
x_1 = add(relu, x)
wait_prefetch(layer=1, anchors=[empty, x_1])
linear_2 = linear(x_1, slot_s1_fc_weight, slot_s1_fc_bias)
start_prefetch(layer=3, anchors=[empty, linear_2])
relu_1 = relu(linear_2)
x_2 = add(relu_1, x_1)
wait_prefetch(layer=2, anchors=[empty, x_2])
linear_3 = linear(x_2, slot_s0_fc_weight, slot_s0_fc_bias)
start_prefetch(layer=0, anchors=[empty, linear_3])
relu_2 = relu(linear_3)
x_3 = add(relu_2, x_2)
wait_prefetch(layer=3, anchors=[empty, x_3])
linear_4 = linear(x_3, slot_s1_fc_weight, slot_s1_fc_bias)
start_prefetch(layer=1, anchors=[empty, linear_4])
relu_3 = relu(linear_4)
x_4 = add(relu_3, x_3)
join_after_forward(rejoin=False, anchors=[empty])
return [x_4, empty]""",
        )

    def test_prefetch_step_3_wraps_to_the_next_user_of_each_slot(self):
        # 4 offloaded layers, 3 slots: layer 3 shares slot 0 with layer 0. Layers 1 and 2 are
        # the last users of their slots, so they prefetch layers 1 and 2 of the next forward.
        model, x = _mlp(layers=4)
        (rewrite,) = rewrites(model, prefetch_options(1, 1, 3, per_param=False), x)
        self.assertExpectedInline(
            summary(rewrite.gm),
            """\
slot slot_s0_fc_weight
slot slot_s0_fc_bias
slot slot_s1_fc_weight
slot slot_s1_fc_bias
slot slot_s2_fc_weight
slot slot_s2_fc_bias
empty = empty([0])
x = linear(l_x, proj_in.weight, proj_in.bias)
_log_api_usage_once = _log_api_usage_once('python.nn_module')
wait_prefetch(layer=0, anchors=[empty, x])
linear_1 = linear(x, slot_s0_fc_weight, slot_s0_fc_bias)
start_prefetch(layer=3, anchors=[empty, linear_1])
relu = relu(linear_1)
x_1 = add(relu, x)
wait_prefetch(layer=1, anchors=[empty, x_1])
linear_2 = linear(x_1, slot_s1_fc_weight, slot_s1_fc_bias)
start_prefetch(layer=1, anchors=[empty, linear_2])
relu_1 = relu(linear_2)
x_2 = add(relu_1, x_1)
wait_prefetch(layer=2, anchors=[empty, x_2])
linear_3 = linear(x_2, slot_s2_fc_weight, slot_s2_fc_bias)
start_prefetch(layer=2, anchors=[empty, linear_3])
relu_2 = relu(linear_3)
x_3 = add(relu_2, x_2)
wait_prefetch(layer=3, anchors=[empty, x_3])
linear_4 = linear(x_3, slot_s0_fc_weight, slot_s0_fc_bias)
start_prefetch(layer=0, anchors=[empty, linear_4])
relu_3 = relu(linear_4)
x_4 = add(relu_3, x_3)
join_after_forward(rejoin=False, anchors=[empty])
return [x_4, empty]""",
        )

    def test_group_pattern_offloads_last_of_each_group(self):
        model, x = _mlp(layers=4)
        (rewrite,) = rewrites(model, prefetch_options(2, 1, 1, per_param=False), x)
        self.assertExpectedInline(
            summary(rewrite.gm),
            """\
slot slot_s0_fc_weight
slot slot_s0_fc_bias
empty = empty([0])
x = linear(l_x, proj_in.weight, proj_in.bias)
_log_api_usage_once = _log_api_usage_once('python.nn_module')
linear_1 = linear(x, blocks.0.fc.weight, blocks.0.fc.bias)
relu = relu(linear_1)
x_1 = add(relu, x)
wait_prefetch(layer=1, anchors=[empty, x_1])
linear_2 = linear(x_1, slot_s0_fc_weight, slot_s0_fc_bias)
start_prefetch(layer=3, anchors=[empty, linear_2])
relu_1 = relu(linear_2)
x_2 = add(relu_1, x_1)
linear_3 = linear(x_2, blocks.2.fc.weight, blocks.2.fc.bias)
relu_2 = relu(linear_3)
x_3 = add(relu_2, x_2)
wait_prefetch(layer=3, anchors=[empty, x_3])
linear_4 = linear(x_3, slot_s0_fc_weight, slot_s0_fc_bias)
start_prefetch(layer=1, anchors=[empty, linear_4])
relu_3 = relu(linear_4)
x_4 = add(relu_3, x_3)
join_after_forward(rejoin=False, anchors=[empty])
return [x_4, empty]""",
        )

    def test_offload_params_selects_only_matching_parameters(self):
        model, x = _mlp(layers=2)
        (rewrite,) = rewrites(
            model, prefetch_options(1, 1, 1, offload_params=["fc.weight"], per_param=False), x
        )
        self.assertExpectedInline(
            summary(rewrite.gm),
            """\
slot slot_s0_fc_weight
empty = empty([0])
x = linear(l_x, proj_in.weight, proj_in.bias)
_log_api_usage_once = _log_api_usage_once('python.nn_module')
wait_prefetch(layer=0, anchors=[empty, x])
linear_1 = linear(x, slot_s0_fc_weight, blocks.0.fc.bias)
start_prefetch(layer=1, anchors=[empty, linear_1])
relu = relu(linear_1)
x_1 = add(relu, x)
wait_prefetch(layer=1, anchors=[empty, x_1])
linear_2 = linear(x_1, slot_s0_fc_weight, blocks.1.fc.bias)
start_prefetch(layer=0, anchors=[empty, linear_2])
relu_1 = relu(linear_2)
x_2 = add(relu_1, x_1)
join_after_forward(rejoin=False, anchors=[empty])
return [x_2, empty]""",
        )

    def test_graph_break_between_layers_keeps_global_layer_numbers(self):
        model, x = _mlp(layers=4, graph_break_after=1)
        first, second = rewrites(model, prefetch_options(1, 1, 2, per_param=False), x)
        self.assertExpectedInline(
            summary(first.gm),
            """\
slot slot_s0_fc_weight
slot slot_s0_fc_bias
slot slot_s1_fc_weight
slot slot_s1_fc_bias
empty = empty([0])
x = linear(l_x, proj_in.weight, proj_in.bias)
_log_api_usage_once = _log_api_usage_once('python.nn_module')
wait_prefetch(layer=0, anchors=[empty, x])
linear_1 = linear(x, slot_s0_fc_weight, slot_s0_fc_bias)
start_prefetch(layer=2, anchors=[empty, linear_1])
relu = relu(linear_1)
x_1 = add(relu, x)
wait_prefetch(layer=1, anchors=[empty, x_1])
linear_2 = linear(x_1, slot_s1_fc_weight, slot_s1_fc_bias)
start_prefetch(layer=3, anchors=[empty, linear_2])
relu_1 = relu(linear_2)
x_2 = add(relu_1, x_1)
join_after_forward(rejoin=False, anchors=[empty])
return [x_2, empty]""",
        )
        self.assertExpectedInline(
            summary(second.gm),
            """\
slot slot_s0_fc_weight
slot slot_s0_fc_bias
slot slot_s1_fc_weight
slot slot_s1_fc_bias
empty = empty([0])
_log_api_usage_once = _log_api_usage_once('python.nn_module')
clone = clone(l_x)
wait_prefetch(layer=2, anchors=[empty, clone])
linear = linear(clone, slot_s0_fc_weight, slot_s0_fc_bias)
start_prefetch(layer=0, anchors=[empty, linear])
relu = relu(linear)
x = add(relu, l_x)
wait_prefetch(layer=3, anchors=[empty, x])
linear_1 = linear(x, slot_s1_fc_weight, slot_s1_fc_bias)
start_prefetch(layer=1, anchors=[empty, linear_1])
relu_1 = relu(linear_1)
x_1 = add(relu_1, x)
join_after_forward(rejoin=False, anchors=[empty])
return [x_1, empty]""",
        )

    def test_two_stacks_form_one_ring_with_the_group_pattern_over_their_concatenation(self):
        # encoder blocks are layers 0-2, decoder blocks 3-5; group 2 offloads 1, 3 and 5, and the
        # copy after encoder layer 1 fills the slot for decoder layer 3 (the ring crosses)
        torch.manual_seed(0)
        model, x = TwoStacks(), torch.randn(2, 8)
        (rewrite,) = rewrites(model, prefetch_options(2, 1, 1, per_param=False), x)
        self.assertExpectedInline(
            summary(rewrite.gm),
            """\
slot slot_s0_fc_weight
slot slot_s0_fc_bias
slot slot_s0_gate_weight
slot slot_s0_value_weight
empty = empty([0])
linear = linear(l_x, encoder.0.fc.weight, encoder.0.fc.bias)
relu = relu(linear)
x = add(relu, l_x)
wait_prefetch(layer=1, anchors=[empty, x])
linear_1 = linear(x, slot_s0_fc_weight, slot_s0_fc_bias)
start_prefetch(layer=3, anchors=[empty, linear_1])
relu_1 = relu(linear_1)
x_1 = add(relu_1, x)
linear_2 = linear(x_1, encoder.2.fc.weight, encoder.2.fc.bias)
relu_2 = relu(linear_2)
x_2 = add(relu_2, x_1)
wait_prefetch(layer=3, anchors=[empty, x_2])
linear_3 = linear(x_2, slot_s0_gate_weight, None)
sigmoid = sigmoid(linear_3)
linear_4 = linear(x_2, slot_s0_value_weight, None)
start_prefetch(layer=5, anchors=[empty, sigmoid, linear_4])
mul = mul(sigmoid, linear_4)
x_3 = add(x_2, mul)
linear_5 = linear(x_3, decoder.1.gate.weight, None)
sigmoid_1 = sigmoid(linear_5)
linear_6 = linear(x_3, decoder.1.value.weight, None)
mul_1 = mul(sigmoid_1, linear_6)
x_4 = add(x_3, mul_1)
wait_prefetch(layer=5, anchors=[empty, x_4])
linear_7 = linear(x_4, slot_s0_gate_weight, None)
sigmoid_2 = sigmoid(linear_7)
linear_8 = linear(x_4, slot_s0_value_weight, None)
start_prefetch(layer=1, anchors=[empty, sigmoid_2, linear_8])
mul_2 = mul(sigmoid_2, linear_8)
x_5 = add(x_4, mul_2)
join_after_forward(rejoin=False, anchors=[empty])
return [x_5, empty]""",
        )

    def test_two_stacks_in_two_graphs_keep_one_ring(self):
        # the decoder compiled on its own still numbers its blocks after the encoder's, and the
        # last decoder layer's slot is refilled for the first encoder layer of the next call
        torch.manual_seed(0)
        model, x = TwoStacks(encoder=2, decoder=2, graph_break=True), torch.randn(2, 8)
        first, second = rewrites(model, prefetch_options(1, 1, 2, per_param=False), x)
        self.assertExpectedInline(
            summary(first.gm),
            """\
slot slot_s0_fc_weight
slot slot_s0_fc_bias
slot slot_s1_fc_weight
slot slot_s1_fc_bias
empty = empty([0])
clone = clone(l_x)
wait_prefetch(layer=0, anchors=[empty, clone])
linear = linear(clone, slot_s0_fc_weight, slot_s0_fc_bias)
start_prefetch(layer=2, anchors=[empty, linear])
relu = relu(linear)
x = add(relu, l_x)
wait_prefetch(layer=1, anchors=[empty, x])
linear_1 = linear(x, slot_s1_fc_weight, slot_s1_fc_bias)
start_prefetch(layer=3, anchors=[empty, linear_1])
relu_1 = relu(linear_1)
x_1 = add(relu_1, x)
join_after_forward(rejoin=False, anchors=[empty])
return [x_1, empty]""",
        )
        self.assertExpectedInline(
            summary(second.gm),
            """\
slot slot_s0_gate_weight
slot slot_s0_value_weight
slot slot_s1_gate_weight
slot slot_s1_value_weight
empty = empty([0])
clone = clone(l_x)
wait_prefetch(layer=2, anchors=[empty, clone])
linear = linear(clone, slot_s0_gate_weight, None)
sigmoid = sigmoid(linear)
linear_1 = linear(clone, slot_s0_value_weight, None)
start_prefetch(layer=0, anchors=[empty, sigmoid, linear_1])
mul = mul(sigmoid, linear_1)
x = add(l_x, mul)
wait_prefetch(layer=3, anchors=[empty, x])
linear_2 = linear(x, slot_s1_gate_weight, None)
sigmoid_1 = sigmoid(linear_2)
linear_3 = linear(x, slot_s1_value_weight, None)
start_prefetch(layer=1, anchors=[empty, sigmoid_1, linear_3])
mul_1 = mul(sigmoid_1, linear_3)
x_1 = add(x, mul_1)
join_after_forward(rejoin=False, anchors=[empty])
return [x_1, empty]""",
        )

    def test_under_cuda_graphs_a_copy_with_no_work_left_starts_at_the_top(self):
        # Layer 3 is the last user of slot 1; copying layer 1 in after it would leave nothing
        # to overlap before the join. Under CUDA graphs it starts at the top of the next call.
        model, x = _mlp(layers=4)
        (rewrite,) = rewrites(model, prefetch_options(1, 1, 2, per_param=False), x, rejoin=True)
        self.assertExpectedInline(
            summary(rewrite.gm),
            """\
slot slot_s0_fc_weight
slot slot_s0_fc_bias
slot slot_s1_fc_weight
slot slot_s1_fc_bias
empty = empty([0])
start_prefetch(layer=1, anchors=[empty])
x = linear(l_x, proj_in.weight, proj_in.bias)
_log_api_usage_once = _log_api_usage_once('python.nn_module')
wait_prefetch(layer=0, anchors=[empty, x])
linear_1 = linear(x, slot_s0_fc_weight, slot_s0_fc_bias)
start_prefetch(layer=2, anchors=[empty, linear_1])
relu = relu(linear_1)
x_1 = add(relu, x)
wait_prefetch(layer=1, anchors=[empty, x_1])
linear_2 = linear(x_1, slot_s1_fc_weight, slot_s1_fc_bias)
start_prefetch(layer=3, anchors=[empty, linear_2])
relu_1 = relu(linear_2)
x_2 = add(relu_1, x_1)
wait_prefetch(layer=2, anchors=[empty, x_2])
linear_3 = linear(x_2, slot_s0_fc_weight, slot_s0_fc_bias)
start_prefetch(layer=0, anchors=[empty, linear_3])
relu_2 = relu(linear_3)
x_3 = add(relu_2, x_2)
wait_prefetch(layer=3, anchors=[empty, x_3])
linear_4 = linear(x_3, slot_s1_fc_weight, slot_s1_fc_bias)
relu_3 = relu(linear_4)
x_4 = add(relu_3, x_3)
join_after_forward(rejoin=True, anchors=[empty])
return [x_4, empty]""",
        )

    def test_under_cuda_graphs_a_long_tail_keeps_the_next_calls_copies_at_the_end(self):
        # Per parameter, layer 0's copies for the next call start after layer 2's reads, or at
        # the top of the next call when less work is left after them than comes before their
        # reader. The work is estimated in time, not counted in nodes: with a large head the
        # single lm_head node outlasts layer 0, so every copy overlaps it (a count of nodes
        # started five of them at the top and left the copy engine idle through the head).
        def graph_top_starts(vocab: int) -> list[tuple]:
            torch.manual_seed(0)
            model = LlamaShaped(layers=3, dim=32, heads=4, kv_heads=2, hidden=64, vocab=vocab)
            ids = torch.randint(0, vocab, (1, 8))
            options = prefetch_options(1, 1, 1, per_param=True)
            (rewrite,) = rewrites(model, options, ids, rejoin=True)
            nodes = list(rewrite.gm.graph.nodes)
            first_wait = next(i for i, n in enumerate(nodes) if n.target is ops.WAIT_PREFETCH)
            return [n.args[2:] for n in nodes[:first_wait] if n.target is ops.START_PREFETCH]

        self.assertEqual(graph_top_starts(vocab=4096), [])
        self.assertExpectedInline(
            str(graph_top_starts(vocab=64)),
            """[(0, 'up_proj.weight'), (0, 'down_proj.weight')]""",
        )

    def test_per_param_streaming_waits_and_starts_each_parameter_on_its_own(self):
        # One slot: layer 1's q_proj weight is copied in as soon as layer 0 has read its own,
        # while layer 0 still computes with the rest of its weights.
        torch.manual_seed(0)
        model = LlamaShaped(layers=2, dim=16, heads=2, kv_heads=1, hidden=32, vocab=32)
        options = prefetch_options(1, 1, 1, per_param=True)
        (rewrite,) = rewrites(model, options, torch.randint(0, 32, (1, 4)))
        ops = [
            line
            for line in summary(rewrite.gm).splitlines()
            if "prefetch" in line or "join" in line or ("slot_s0_" in line and "=" in line)
        ]
        self.assertExpectedInline(
            "\n".join(ops),
            """\
wait_prefetch(layer=0, param=input_norm.weight, anchors=[empty, mul])
h = mul(mul, slot_s0_input_norm_weight)
start_prefetch(layer=1, param=input_norm.weight, anchors=[empty, h])
wait_prefetch(layer=0, param=q_proj.weight, anchors=[empty, h])
linear = linear(h, slot_s0_q_proj_weight, None)
start_prefetch(layer=1, param=q_proj.weight, anchors=[empty, linear])
wait_prefetch(layer=0, param=k_proj.weight, anchors=[empty, h])
linear_1 = linear(h, slot_s0_k_proj_weight, None)
start_prefetch(layer=1, param=k_proj.weight, anchors=[empty, linear_1])
wait_prefetch(layer=0, param=v_proj.weight, anchors=[empty, h])
linear_2 = linear(h, slot_s0_v_proj_weight, None)
start_prefetch(layer=1, param=v_proj.weight, anchors=[empty, linear_2])
wait_prefetch(layer=0, param=o_proj.weight, anchors=[empty, reshape])
linear_3 = linear(reshape, slot_s0_o_proj_weight, None)
start_prefetch(layer=1, param=o_proj.weight, anchors=[empty, linear_3])
wait_prefetch(layer=0, param=post_norm.weight, anchors=[empty, mul_2])
h_1 = mul(mul_2, slot_s0_post_norm_weight)
start_prefetch(layer=1, param=post_norm.weight, anchors=[empty, h_1])
wait_prefetch(layer=0, param=gate_proj.weight, anchors=[empty, h_1])
linear_4 = linear(h_1, slot_s0_gate_proj_weight, None)
start_prefetch(layer=1, param=gate_proj.weight, anchors=[empty, linear_4])
wait_prefetch(layer=0, param=up_proj.weight, anchors=[empty, h_1])
linear_5 = linear(h_1, slot_s0_up_proj_weight, None)
start_prefetch(layer=1, param=up_proj.weight, anchors=[empty, linear_5])
wait_prefetch(layer=0, param=down_proj.weight, anchors=[empty, mul_4])
linear_6 = linear(mul_4, slot_s0_down_proj_weight, None)
start_prefetch(layer=1, param=down_proj.weight, anchors=[empty, linear_6])
wait_prefetch(layer=1, param=input_norm.weight, anchors=[empty, mul_5])
h_2 = mul(mul_5, slot_s0_input_norm_weight)
start_prefetch(layer=0, param=input_norm.weight, anchors=[empty, h_2])
wait_prefetch(layer=1, param=q_proj.weight, anchors=[empty, h_2])
linear_7 = linear(h_2, slot_s0_q_proj_weight, None)
start_prefetch(layer=0, param=q_proj.weight, anchors=[empty, linear_7])
wait_prefetch(layer=1, param=k_proj.weight, anchors=[empty, h_2])
linear_8 = linear(h_2, slot_s0_k_proj_weight, None)
start_prefetch(layer=0, param=k_proj.weight, anchors=[empty, linear_8])
wait_prefetch(layer=1, param=v_proj.weight, anchors=[empty, h_2])
linear_9 = linear(h_2, slot_s0_v_proj_weight, None)
start_prefetch(layer=0, param=v_proj.weight, anchors=[empty, linear_9])
wait_prefetch(layer=1, param=o_proj.weight, anchors=[empty, reshape_1])
linear_10 = linear(reshape_1, slot_s0_o_proj_weight, None)
start_prefetch(layer=0, param=o_proj.weight, anchors=[empty, linear_10])
wait_prefetch(layer=1, param=post_norm.weight, anchors=[empty, mul_7])
h_3 = mul(mul_7, slot_s0_post_norm_weight)
start_prefetch(layer=0, param=post_norm.weight, anchors=[empty, h_3])
wait_prefetch(layer=1, param=gate_proj.weight, anchors=[empty, h_3])
linear_11 = linear(h_3, slot_s0_gate_proj_weight, None)
start_prefetch(layer=0, param=gate_proj.weight, anchors=[empty, linear_11])
wait_prefetch(layer=1, param=up_proj.weight, anchors=[empty, h_3])
linear_12 = linear(h_3, slot_s0_up_proj_weight, None)
start_prefetch(layer=0, param=up_proj.weight, anchors=[empty, linear_12])
wait_prefetch(layer=1, param=down_proj.weight, anchors=[empty, mul_9])
linear_13 = linear(mul_9, slot_s0_down_proj_weight, None)
start_prefetch(layer=0, param=down_proj.weight, anchors=[empty, linear_13])
join_after_forward(rejoin=False, anchors=[empty])""",
        )

    def test_llama_layer_wait_anchors_live_activations_and_start_anchors_layer_outputs(self):
        torch.manual_seed(0)
        model = LlamaShaped(layers=2, dim=16, heads=2, kv_heads=1, hidden=32, vocab=32)
        (rewrite,) = rewrites(
            model, prefetch_options(2, 1, 1, per_param=False), torch.randint(0, 32, (1, 4))
        )
        ops = [
            line
            for line in summary(rewrite.gm).splitlines()
            if "prefetch" in line or "join" in line or "slot" in line
        ]
        self.assertExpectedInline(
            "\n".join(ops),
            """\
slot slot_s0_input_norm_weight
slot slot_s0_q_proj_weight
slot slot_s0_k_proj_weight
slot slot_s0_v_proj_weight
slot slot_s0_o_proj_weight
slot slot_s0_post_norm_weight
slot slot_s0_gate_proj_weight
slot slot_s0_up_proj_weight
slot slot_s0_down_proj_weight
wait_prefetch(layer=1, anchors=[empty, mul_5, x_2])
h_2 = mul(mul_5, slot_s0_input_norm_weight)
linear_7 = linear(h_2, slot_s0_q_proj_weight, None)
linear_8 = linear(h_2, slot_s0_k_proj_weight, None)
linear_9 = linear(h_2, slot_s0_v_proj_weight, None)
linear_10 = linear(reshape_1, slot_s0_o_proj_weight, None)
h_3 = mul(mul_7, slot_s0_post_norm_weight)
linear_11 = linear(h_3, slot_s0_gate_proj_weight, None)
linear_12 = linear(h_3, slot_s0_up_proj_weight, None)
linear_13 = linear(mul_9, slot_s0_down_proj_weight, None)
start_prefetch(layer=1, anchors=[empty, x_3, linear_13])
join_after_forward(rejoin=False, anchors=[empty])""",
        )


def test_slots_are_appended_as_static_inputs():
    model, x = _mlp(layers=4)
    (rewrite,) = rewrites(model, prefetch_options(1, 1, 2, per_param=False), x)
    placeholders = rewrite.gm.graph.find_nodes(op="placeholder")
    slots = placeholders[-len(rewrite.slots) :]
    assert len(rewrite.slots) == 4  # fc.weight and fc.bias, two slots
    for node, tensor in zip(slots, rewrite.slots, strict=True):
        assert node.name.startswith("offload_slot_")
        assert node.meta["tensor_dict"]["_dynamo_static_input_type"] == "unguarded"
        assert tuple(node.meta["example_value"].shape) == tuple(tensor.shape)
    assert rewrite.extra_outputs == 1


def test_offloaded_parameter_placeholders_are_left_unused():
    model, x = _mlp(layers=2)
    (rewrite,) = rewrites(model, prefetch_options(1, 1, 1, per_param=False), x)
    for node in rewrite.gm.graph.find_nodes(op="placeholder"):
        if "blocks" in node.name:
            assert not node.users, node.name


class ReturnsWeight(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))

    def forward(self, x):
        return self.layers[0](x), self.layers[1].weight.t()


def test_returning_an_offloaded_weight_is_refused():
    with pytest.raises(BackendCompilerFailed, match="returns a parameter of offloaded layer 1"):
        rewrites(ReturnsWeight(), prefetch_options(1, 1, 1, per_param=False), torch.randn(2, 4))


class WeightOnly(torch.nn.Module):
    """A layer whose weight feeds work that reads no activation (here: a weight sum)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))

    def forward(self, x):
        total = x.sum()
        for layer in self.layers:
            total = total + layer.weight.sum() * layer.bias.sum()
        return total


def test_weight_only_computation_is_ordered_after_the_wait():
    (rewrite,) = rewrites(
        WeightOnly(), prefetch_options(1, 1, 1, per_param=False), torch.randn(2, 4)
    )
    lines = summary(rewrite.gm).splitlines()
    wait = next(i for i, line in enumerate(lines) if line.startswith("wait_prefetch(layer=0"))
    first_read = next(i for i, line in enumerate(lines) if "slot_s0_weight)" in line)
    assert wait < first_read
