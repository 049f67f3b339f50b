"""The ``offload`` backend end to end on CPU: numerics against plain Inductor, options, errors.

On CPU start_prefetch is a synchronous copy into the slot, so a read placed after the copy of
the next layer into the same slot, or a read of the wrong slot, changes the numbers: the tests
below compare every call, the first one included, and show that such mistakes are caught.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.exc import BackendCompilerFailed

import offload_compiler
from offload_compiler import OffloadConfig
from offload_compiler.backend import compile_graph, offload_backend, rewrite_graph
from tests.common import prefetch_options
from tests.models import LlamaShaped, MLPStack, PerLayerBreaks, clone_model

REPO = Path(__file__).resolve().parents[1]


def _compare(model, options, make_input, calls: int = 4, reference=None):
    """Max abs difference between offloaded and plain Inductor over ``calls`` fresh inputs."""
    if reference is None:
        reference = torch.compile(clone_model(model))
    compiled = torch.compile(model, backend="offload", options=options)
    worst = []
    with torch.no_grad():
        for _ in range(calls):
            x = make_input()
            worst.append((compiled(x) - reference(x)).abs().max().item())
    return worst


def _mlp_input():
    return torch.randn(3, 16)


@pytest.mark.parametrize(
    ("group", "num", "step", "params"),
    [
        (1, 1, 1, ()),
        (1, 1, 2, ()),
        (1, 1, 4, ()),  # 6 layers, 4 slots: the wrap-around is not (k + step) % n
        (2, 1, 1, ()),
        (3, 2, 2, ()),
        (1, 1, 1, ("fc.weight",)),
    ],
)
def test_mlp_equals_inductor_on_every_call(group, num, step, params):
    torch.manual_seed(0)
    options = prefetch_options(group, num, step, offload_params=list(params))
    worst = _compare(MLPStack(layers=6, dim=16), options, _mlp_input)
    assert max(worst) <= 1e-5, worst


@pytest.mark.parametrize(("group", "num", "step"), [(2, 1, 1), (1, 1, 2)])
def test_llama_equals_inductor_on_every_call(group, num, step):
    torch.manual_seed(0)
    model = LlamaShaped(layers=4, dim=32, heads=4, kv_heads=2, hidden=64, vocab=64)
    worst = _compare(
        model, prefetch_options(group, num, step), lambda: torch.randint(0, 64, (2, 12))
    )
    assert max(worst) <= 1e-5, worst


def test_graph_break_between_layers_equals_inductor():
    torch.manual_seed(0)
    worst = _compare(
        MLPStack(layers=6, dim=16, graph_break_after=2), prefetch_options(1, 1, 2), _mlp_input
    )
    assert max(worst) <= 1e-5, worst


def test_graph_break_inside_the_layer_loop_with_place_model():
    """Each block compiled on its own frame: place_model makes the layer list known."""
    torch.manual_seed(0)
    model = PerLayerBreaks(layers=4, dim=16)
    reference = torch.compile(clone_model(model))
    options = prefetch_options(1, 1, 2)
    offload_compiler.place_model(model, options, "cpu")
    worst = _compare(model, options, _mlp_input, reference=reference)
    assert max(worst) <= 1e-5, worst


def test_state_dict_reads_back_bit_for_bit():
    torch.manual_seed(0)
    model = LlamaShaped(layers=4, dim=32, heads=4, kv_heads=2, hidden=64, vocab=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    named_before = {k: v.clone() for k, v in model.named_parameters()}
    compiled = torch.compile(model, backend="offload", options=prefetch_options(1, 1, 1))
    with torch.no_grad():
        for _ in range(3):
            compiled(torch.randint(0, 64, (1, 8)))
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(torch.equal(p, named_before[k]) for k, p in model.named_parameters())


def _compile_with(model, options, mutate):
    """Compile ``model`` through the real rewrite, with ``mutate(rewrite)`` applied before
    Inductor: a way to inject the mistakes the tests must be able to catch."""

    def backend(gm, example_inputs):
        graph = rewrite_graph(gm, example_inputs, options)
        mutate(graph)
        graph.gm.recompile()
        return compile_graph(graph, example_inputs)

    return torch.compile(model, backend=backend)


def _first_call_error(model, options, mutate) -> float:
    reference = torch.compile(clone_model(model))
    compiled = _compile_with(model, options, mutate)
    with torch.no_grad():
        x = _mlp_input()
        return (compiled(x) - reference(x)).abs().max().item()


def test_a_start_prefetch_before_the_layers_reads_gives_wrong_numbers():
    """Move layer 0's start_prefetch (which copies layer 1 into the shared slot) in front of
    layer 0's first read: the very first call must come out wrong."""

    def misplace_start(rewrite):
        graph = rewrite.gm.graph
        start = next(n for n in graph.nodes if "start_prefetch" in str(n.target))
        wait = next(n for n in graph.nodes if "wait_prefetch" in str(n.target))
        start.args = (wait.args[0], *start.args[1:])  # anchored on the layer input instead
        wait.append(start)

    torch.manual_seed(0)
    assert (
        _first_call_error(
            MLPStack(layers=4, dim=16), prefetch_options(1, 1, 1, per_param=False), misplace_start
        )
        > 1e-2
    )


def test_a_per_param_start_before_its_parameters_reads_gives_wrong_numbers():
    """With per-parameter streaming, move the first start (layer 1's fc.weight into the one
    slot) in front of layer 0's read of fc.weight: the first call must come out wrong."""

    def misplace_start(rewrite):
        graph = rewrite.gm.graph
        start = next(n for n in graph.nodes if "start_prefetch" in str(n.target))
        wait = next(
            n
            for n in graph.nodes
            if "wait_prefetch" in str(n.target) and n.args[3:] == start.args[3:]
        )
        start.args = (wait.args[0], *start.args[1:])
        wait.append(start)

    torch.manual_seed(0)
    options = prefetch_options(1, 1, 1, per_param=True)
    assert _first_call_error(MLPStack(layers=4, dim=16), options, misplace_start) > 1e-2


def test_reading_the_wrong_slot_gives_wrong_numbers():
    """Point layer 1 at slot 0's buffers (step 2): the first call must come out wrong."""

    def swap_slots(rewrite):
        placeholders = rewrite.gm.graph.find_nodes(op="placeholder")
        slot0 = [n for n in placeholders if "_s0_" in n.name]
        slot1 = [n for n in placeholders if "_s1_" in n.name]
        for old, new in zip(slot1, slot0, strict=True):
            old.replace_all_uses_with(new)

    torch.manual_seed(0)
    assert (
        _first_call_error(MLPStack(layers=4, dim=16), prefetch_options(1, 1, 2), swap_slots) > 1e-2
    )


def test_options_accept_a_config_instance_and_noprefetch_options():
    torch.manual_seed(0)
    config = OffloadConfig.model_validate(prefetch_options(2, 1, 1))
    assert max(_compare(MLPStack(layers=4, dim=16), config, _mlp_input, calls=2)) <= 1e-5
    torch._dynamo.reset()
    model = MLPStack(layers=4, dim=16)
    plain = torch.compile(model, backend="offload")
    with torch.no_grad():
        x = _mlp_input()
        torch.testing.assert_close(plain(x), model(x))


def test_mode_travels_in_theprefetch_options():
    torch.manual_seed(0)
    options = {**prefetch_options(1, 1, 1), "mode": "max-autotune-no-cudagraphs"}
    assert max(_compare(MLPStack(layers=3, dim=16), options, _mlp_input, calls=2)) <= 1e-5


def test_unknown_option_is_a_named_error():
    model = MLPStack(layers=2, dim=16)
    compiled = torch.compile(model, backend="offload", options={"prefetch": {"group_size": 2}})
    with pytest.raises(BackendCompilerFailed, match="group_size"), torch.no_grad():
        compiled(_mlp_input())


def test_grad_mode_is_refused_with_a_clear_error():
    model = MLPStack(layers=2, dim=16)
    compiled = torch.compile(model, backend="offload", options=prefetch_options(1, 1, 1))
    with pytest.raises(BackendCompilerFailed, match="inference only"):
        compiled(_mlp_input())


class NoLayers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x)


def test_model_without_a_layer_list_is_a_clear_error():
    compiled = torch.compile(NoLayers(), backend="offload", options=prefetch_options(1, 1, 1))
    with (
        pytest.raises(BackendCompilerFailed, match=r"no nn\.ModuleList or nn\.Sequential of"),
        torch.no_grad(),
    ):
        compiled(torch.randn(2, 4))


class TwoLists(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
        self.decoder = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))

    def forward(self, x):
        for layer in [*self.encoder, *self.decoder]:
            x = torch.relu(layer(x))
        return x


def test_layers_path_overrides_finding_every_list():
    from tests.graphs import rewrites, summary

    torch.manual_seed(0)
    x = torch.randn(2, 4)
    (default,) = rewrites(TwoLists(), prefetch_options(1, 1, 1, per_param=False), x)
    waits = [line for line in summary(default.gm).splitlines() if "wait_prefetch" in line]
    assert len(waits) == 5  # both lists, 3 + 2 blocks
    (chosen,) = rewrites(
        TwoLists(), {**prefetch_options(1, 1, 1, per_param=False), "layers_path": "decoder"}, x
    )
    chosen_summary = summary(chosen.gm)
    assert "encoder.0.weight" in chosen_summary
    assert len([ln for ln in chosen_summary.splitlines() if "wait_prefetch" in ln]) == 2
    torch._dynamo.reset()
    bad = torch.compile(
        TwoLists(), backend="offload", options={**prefetch_options(1, 1, 1), "layers_path": "nope"}
    )
    with pytest.raises(BackendCompilerFailed, match="layers_path='nope'"), torch.no_grad():
        bad(x)


def test_uva_without_a_budget_says_so(caplog):
    model = MLPStack(layers=2, dim=16)
    compiled = torch.compile(model, backend="offload", options={"offload_backend": "uva"})
    with caplog.at_level(logging.WARNING, logger="offload_compiler"), torch.no_grad():
        x = _mlp_input()
        torch.testing.assert_close(compiled(x), model(x))
    assert any("cpu_offload_gb is 0" in r.getMessage() for r in caplog.records)


def test_backend_is_registered_by_name_on_import():
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("offload") is offload_backend


def test_backend_is_found_through_the_entry_point_without_import():
    """In a fresh process that never imports offload_compiler, the name still resolves."""
    code = (
        "import sys, torch\n"
        "from torch._dynamo.backends.registry import lookup_backend\n"
        "fn = lookup_backend('offload')\n"
        "assert 'offload_compiler' in sys.modules\n"
        "print(fn.__module__, fn.__name__)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/"
    )
    if "InvalidBackend" in out.stderr:
        pytest.fail(
            "the package is not installed: the torch_dynamo_backends entry point is missing"
        )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["offload_compiler.backend", "offload_backend"]


@pytest.mark.parametrize(
    ("mode", "capturable", "rejoin"),
    [
        ("default", False, False),
        ("reduce-overhead", False, True),
        ("default", True, True),
        ("reduce-overhead", True, True),
    ],
)
def test_join_rejoins_graphs_that_run_or_may_be_captured_as_cuda_graphs(
    mode, capturable, rejoin, caplog
):
    """The rewritten graph is logged at DEBUG; its join carries whether to rejoin: under
    reduce-overhead, or in any mode with ``offload_capturable`` (a capture outside Inductor)."""
    torch.manual_seed(0)
    model = MLPStack(layers=2, dim=16)
    options = prefetch_options(1, 1, 1, mode=mode)
    options["prefetch"]["offload_capturable"] = capturable
    compiled = torch.compile(model, backend="offload", options=options)
    with caplog.at_level(logging.DEBUG, logger="offload_compiler.backend"), torch.no_grad():
        compiled(_mlp_input())
    (graph,) = [r.getMessage() for r in caplog.records if "rewritten graph" in r.getMessage()]
    assert re.search(rf"join_after_forward\.default\(\[empty\], \d+, {rejoin}\)", graph), graph


@pytest.mark.parametrize("step", [1, 2, 3])
def test_reduce_overhead_rewrite_with_graph_top_starts_equals_inductor(step):
    """With mode reduce-overhead the graph rejoins at its end and starts some copies for the
    next call at its top (see passes/prefetch.py); on CPU the same graph runs without CUDA
    graphs."""
    torch.manual_seed(0)
    options = {**prefetch_options(1, 1, step), "mode": "reduce-overhead"}
    worst = _compare(MLPStack(layers=6, dim=16), options, _mlp_input, calls=4)
    assert max(worst) <= 1e-5, worst


@pytest.mark.parametrize("per_param", [False, True])
@pytest.mark.parametrize("step", [1, 2])
def test_capturable_default_mode_equals_inductor_on_every_call(step, per_param):
    """Default mode with the CUDA-graph schedule (offload_capturable) runs eagerly as well."""
    torch.manual_seed(0)
    model = LlamaShaped(layers=4, dim=32, heads=4, kv_heads=2, hidden=64, vocab=64)
    options = prefetch_options(2, 1, step, per_param=per_param)
    options["prefetch"]["offload_capturable"] = True
    worst = _compare(model, options, lambda: torch.randint(0, 64, (2, 12)))
    assert max(worst) <= 1e-5, worst


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("step", [1, 2])
def test_per_param_streaming_equals_inductor_on_every_call(step, mode):
    torch.manual_seed(0)
    model = LlamaShaped(layers=4, dim=32, heads=4, kv_heads=2, hidden=64, vocab=64)
    options = prefetch_options(1, 1, step, mode=mode, per_param=True)
    worst = _compare(model, options, lambda: torch.randint(0, 64, (2, 12)))
    assert max(worst) <= 1e-5, worst
