"""GPU tests (marked ``cuda``): equality under Inductor and cudagraph trees, memory, overlap.

Run on a CUDA machine with ``python -m pytest -m cuda tests``. Figures are printed and, when
``OFFLOAD_RESULTS_DIR`` is set, written there as JSON.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters

import offload_compiler
from offload_compiler.host_memory import host_copy, plan_pinned_blocks
from offload_compiler.runtime.counter_order import CounterOrder
from offload_compiler.runtime.registry import _BY_STACK
from tests.common import prefetch_options
from tests.models import LlamaShaped, MLPStack, clone_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

VOCAB = 512


def _record(name: str, figures: dict) -> None:
    print(f"\n{name}: {json.dumps(figures)}")
    out = os.environ.get("OFFLOAD_RESULTS_DIR")
    if out:
        with (Path(out) / "gpu_figures.jsonl").open("a") as f:
            f.write(json.dumps({"test": name, **figures}) + "\n")


@pytest.fixture(autouse=True)
def _fresh_counters_and_memory():
    counters.clear()
    yield
    gc.collect()
    torch.cuda.empty_cache()


def _compiled_pair(
    mode: str, group: int, num: int, step: int, poison: bool, **prefetch: Any
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A seeded 8-layer LlamaShaped model compiled in ``mode`` without offloading (the
    reference) and, the model itself, with the offload backend and this prefetch config
    (``prefetch``: more fields of it, ``offload_host_copies=False``...). Tests that ask for
    the same pair share one compile of each."""
    key = (mode, group, num, step, poison, tuple(sorted(prefetch.items())))
    return _reference(mode), _offloaded(*key)


@functools.cache
def _offloaded(
    mode: str, group: int, num: int, step: int, poison: bool, prefetch: tuple
) -> torch.nn.Module:
    options = prefetch_options(group, num, step, mode=mode, poison_slots=poison)
    options["prefetch"].update(prefetch)
    return torch.compile(_seeded_model(), backend="offload", options=options)


def _seeded_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return LlamaShaped(layers=8, dim=256, heads=8, kv_heads=4, hidden=512, vocab=VOCAB).cuda()


@functools.cache
def _reference(mode: str) -> torch.nn.Module:
    """`_seeded_model` compiled in ``mode`` without offloading: one compile per mode serves
    every test that compares against it."""
    return torch.compile(_seeded_model(), mode=mode)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize(
    ("group", "num", "step", "poison"),
    [(1, 1, 1, False), (1, 1, 2, True), (2, 1, 1, True), (4, 2, 3, False), (8, 2, 2, True)],
)
def test_equals_inductor_over_replays(mode, group, num, step, poison):
    """25 calls with fresh inputs: offloaded == un-offloaded, both compiled in the same mode.

    With ``poison_slots`` every start_prefetch first fills its slot with NaN on the compute
    stream, so a kernel that read a slot after its copy began would put NaN in the output.
    """
    reference, offloaded = _compiled_pair(mode, group, num, step, poison)
    worst = 0.0
    with torch.no_grad():
        for _ in range(25):
            ids = torch.randint(0, VOCAB, (2, 64), device="cuda")
            expected = reference(ids).clone()
            got = offloaded(ids).clone()
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
            worst = max(worst, (got - expected).abs().max().item())
    if mode == "reduce-overhead":
        assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    _record(
        f"equality[{mode},{group}/{num},step{step},poison={poison}]",
        {
            "calls": 25,
            "max_abs_diff": worst,
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
        },
    )


def _trees_copied_inputs(device: torch.device) -> list[str]:
    """The tensors cudagraph trees copy before each replay of the graph they replayed last
    (their non-static inputs less the sizes of a dynamic-shape graph, ints they do not copy)."""
    from torch._inductor import cudagraph_trees

    node = cudagraph_trees.get_manager(device.index).current_node
    assert isinstance(node, cudagraph_trees.CUDAGraphNode)
    names = [p.name for p in node.wrapped_function.placeholders]
    inputs = node.reconstructed_inputs
    return [
        f"{i}:{names[i] if i < len(names) else '?'}:{tuple(inputs[i].shape)}"
        for i in node.non_static_input_idx
        if isinstance(inputs[i], torch.Tensor)
    ]


def test_reduce_overhead_decode_loop_on_its_own_stream_equals_inductor():
    """Under reduce-overhead the token ids are staged (trees copy no input) and the graphs
    launch on a stream of their own. A decode loop that feeds each output's argmax back as the
    next ids, computed on the caller's stream right after the call, gets the un-offloaded
    model's outputs and tokens, with poisoned slots: the caller's stream waits for the graph,
    and the graph for the ids written on the caller's stream."""
    reference, offloaded = _compiled_pair("reduce-overhead", 2, 1, 1, poison=True)
    ids = torch.randint(0, VOCAB, (1, 1), device="cuda")
    with torch.no_grad():
        for _ in range(20):
            expected = reference(ids).clone()
            got = offloaded(ids)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
            ids = got[:, -1:].argmax(-1)  # on the caller's stream, right after the call
            assert torch.equal(ids, expected[:, -1:].argmax(-1))
        assert _trees_copied_inputs(ids.device) == []  # trees copy nothing before a replay
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


def test_reduce_overhead_staging_of_a_dynamic_shape_graph_equals_inductor(caplog):
    """Prompt lengths that change make Dynamo compile a graph of dynamic shape; each length
    gets its own staged buffer (and trees their own recording), taken again when the length
    comes back. Outputs equal the un-offloaded model's at every length, with poisoned slots,
    and trees copy no input."""
    reference, offloaded = _compiled_pair("reduce-overhead", 2, 1, 1, poison=True)
    with caplog.at_level(logging.DEBUG, logger="offload_compiler"), torch.no_grad():
        for tokens in [1, 16, 7, 16, 1, 7, 16]:
            for _ in range(3):
                ids = torch.randint(0, VOCAB, (1, tokens), device="cuda")
                expected = reference(ids).clone()
                torch.testing.assert_close(offloaded(ids), expected, rtol=1e-4, atol=1e-4)
            staging = [r.getMessage() for r in caplog.records if "stag" in r.getMessage()]
            assert _trees_copied_inputs(ids.device) == [], (tokens, staging)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


def test_reduce_overhead_leaves_a_non_contiguous_input_to_trees():
    """A staged buffer takes the input's strides, which a copy cannot fill for a transposed
    input: such an input is not staged, trees copy it, and the outputs stay right."""
    torch.manual_seed(0)
    model = MLPStack(layers=6, dim=512).cuda()
    reference = torch.compile(clone_model(model), mode="reduce-overhead")
    offloaded = torch.compile(
        model, backend="offload", options=prefetch_options(2, 1, 1, mode="reduce-overhead")
    )
    with torch.no_grad():
        for _ in range(5):
            x = torch.randn(512, 64, device="cuda").t()
            assert not x.is_contiguous()
            torch.testing.assert_close(offloaded(x).clone(), reference(x).clone())
        assert _trees_copied_inputs(x.device) != []


@pytest.mark.parametrize(("group", "step"), [(1, 2), (2, 1)])
def test_capturable_model_captured_by_hand_equals_inductor(group, step):
    """With ``offload_capturable`` a default-mode compile can be captured outside Inductor, as
    a serving framework's CUDA-graph wrapper does: 10 replays with fresh inputs copied into the
    captured input equal the un-offloaded compiled model, with poisoned slots."""
    torch.manual_seed(0)
    model = LlamaShaped(layers=8, dim=256, heads=8, kv_heads=4, hidden=512, vocab=VOCAB).cuda()
    reference = torch.compile(clone_model(model))
    options = prefetch_options(group, 1, step, poison_slots=True)
    options["prefetch"]["offload_capturable"] = True
    offloaded = torch.compile(model, backend="offload", options=options)
    ids = torch.randint(0, VOCAB, (2, 64), device="cuda")
    with torch.no_grad():
        for _ in range(3):  # compile, warm up
            offloaded(ids)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = offloaded(ids)
        for _ in range(10):
            ids.copy_(torch.randint(0, VOCAB, (2, 64), device="cuda"))
            graph.replay()
            torch.testing.assert_close(out.clone(), reference(ids), rtol=1e-4, atol=1e-4)


def test_hand_capture_without_capturable_names_the_option_and_keeps_the_model():
    """A default-mode compile leaves the next forward's copies in flight; captured by hand, its
    first wait would make the capture depend on them (CUDA invalidates the capture). The
    runtime refuses first, naming the option, and the model still runs and equals Inductor."""
    torch.manual_seed(0)
    model = LlamaShaped(layers=4, dim=128, heads=4, kv_heads=2, hidden=256, vocab=VOCAB).cuda()
    reference = torch.compile(clone_model(model))
    offloaded = torch.compile(model, backend="offload", options=prefetch_options(2, 1, 1))
    ids = torch.randint(0, VOCAB, (1, 16), device="cuda")
    with torch.no_grad():
        for _ in range(3):
            offloaded(ids)
        graph = torch.cuda.CUDAGraph()
        with (
            pytest.raises(RuntimeError, match=r"prefetch\.offload_capturable"),
            torch.cuda.graph(graph),
        ):
            offloaded(ids)
        torch.cuda.synchronize()
        for _ in range(3):
            torch.testing.assert_close(offloaded(ids), reference(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_graph_break_between_layers_over_replays(mode):
    """Two graphs per forward; each joins its copies, the second prefetches for the first."""
    torch.manual_seed(0)
    model = MLPStack(layers=6, dim=512, graph_break_after=2).cuda()
    reference = torch.compile(clone_model(model), mode=mode)
    offloaded = torch.compile(
        model, backend="offload", options=prefetch_options(1, 1, 2, mode=mode, poison_slots=True)
    )
    with torch.no_grad():
        for _ in range(25):
            x = torch.randn(64, 512, device="cuda")
            torch.testing.assert_close(offloaded(x).clone(), reference(x).clone())
    if mode == "reduce-overhead":
        assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


def test_state_dict_survives_compiled_calls():
    torch.manual_seed(0)
    model = LlamaShaped(layers=4, dim=128, heads=4, kv_heads=2, hidden=256, vocab=VOCAB).cuda()
    original = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    compiled = torch.compile(
        model, backend="offload", options=prefetch_options(2, 1, 1, mode="reduce-overhead")
    )
    with torch.no_grad():
        for _ in range(5):
            compiled(torch.randint(0, VOCAB, (1, 16), device="cuda"))
    torch.cuda.synchronize()
    after = model.state_dict()
    assert after.keys() == original.keys()
    for name, value in after.items():
        assert value.device.type == "cuda"
        assert torch.equal(value.cpu(), original[name]), name
    offloaded = model.layers[1].q_proj.weight
    assert offloaded_is_host_view(offloaded)


def offloaded_is_host_view(param: torch.Tensor) -> bool:
    host = host_copy(param)
    return host is not None and host.is_pinned() and host.data_ptr() == param.data_ptr()


def test_gpu_memory_drops_to_slot_pool():
    """After compile, the offloaded layers hold only the slot pool on the GPU."""
    torch.manual_seed(0)
    model = LlamaShaped(layers=8, dim=1024, heads=8, kv_heads=4, hidden=2048, vocab=VOCAB).cuda()
    layer_bytes = sum(p.nbytes for p in model.layers[0].parameters())
    ids = torch.randint(0, VOCAB, (1, 32), device="cuda")
    with torch.no_grad():
        model(ids)  # allocates what any forward keeps (the cuBLAS workspace)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    compiled = torch.compile(model, backend="offload", options=prefetch_options(2, 1, 2))
    with torch.no_grad():
        out = compiled(ids)
    del out
    gc.collect()
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated()
    offloaded_bytes, slot_bytes = 4 * layer_bytes, 2 * layer_bytes
    drop = before - after
    _record(
        "memory_drop",
        {
            "before_bytes": before,
            "after_bytes": after,
            "drop_bytes": drop,
            "offloaded_bytes": offloaded_bytes,
            "slot_pool_bytes": slot_bytes,
        },
    )
    assert drop == pytest.approx(offloaded_bytes - slot_bytes, rel=0.02)


def test_place_model_never_holds_the_whole_model():
    torch.manual_seed(0)
    model = LlamaShaped(layers=8, dim=1024, heads=8, kv_heads=4, hidden=2048, vocab=VOCAB)
    reference_model = clone_model(model)
    total = sum(p.nbytes for p in model.parameters())
    layer_bytes = sum(p.nbytes for p in model.layers[0].parameters())
    options = prefetch_options(1, 1, 2)  # every layer offloaded, two slots
    torch.ones(8, 8, device="cuda") @ torch.ones(8, 8, device="cuda")  # cuBLAS workspace first
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    offload_compiler.place_model(model, options, "cuda")
    compiled = torch.compile(model, backend="offload", options=options)
    ids = torch.randint(0, VOCAB, (1, 32), device="cuda")
    with torch.no_grad():
        got = compiled(ids).clone()
    peak = torch.cuda.max_memory_allocated() - base
    resident = total - 8 * layer_bytes
    _record(
        "place_model_peak",
        {"model_bytes": total, "resident_bytes": resident, "slots": 2 * layer_bytes, "peak": peak},
    )
    assert peak < resident + 2 * layer_bytes + 64 * 2**20
    assert peak < total
    with torch.no_grad():
        expected = torch.compile(reference_model.cuda())(ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_offloaded_weights_share_pinned_blocks_without_rounding_waste():
    """Weights of 3 x 2^k bytes pinned one by one would take 16/9 of their size (the pinned
    allocator rounds each request up to a power of two); packed, exactly the planned blocks are
    pinned, within 3% of the weights, and every parameter still reads its own values."""
    torch.manual_seed(0)
    model = LlamaShaped(layers=4, dim=384, heads=6, kv_heads=2, hidden=1536, vocab=VOCAB)
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    offload_compiler.place_model(model, prefetch_options(1, 1, 1), "cuda")
    hosts = [host_copy(p) for p in model.parameters() if host_copy(p) is not None]
    # the blocks the host copies are carved from (not the process-wide pinned statistics, which
    # other tests' models freed meanwhile would lower): each a power of two, which the pinned
    # allocator takes without rounding up
    blocks = {h.untyped_storage().data_ptr(): h.untyped_storage().nbytes() for h in hosts}
    assert all(size & (size - 1) == 0 for size in blocks.values()), sorted(blocks.values())
    pinned = sum(blocks.values())
    weights = sum(h.nbytes for h in hosts)
    one_by_one = sum(1 << (h.nbytes - 1).bit_length() for h in hosts)
    planned = sum(plan_pinned_blocks([h.nbytes for h in hosts]).block_bytes)
    _record(
        "pinned_packing",
        {"weights": weights, "pinned": pinned, "planned": planned, "one_by_one": one_by_one},
    )
    assert one_by_one > 1.5 * weights  # the case packing is for
    assert pinned == planned <= 1.03 * weights
    assert all(h.is_pinned() for h in hosts)
    for name, param in model.named_parameters():
        assert torch.equal(param.detach().cpu(), original[name]), name


@pytest.mark.parametrize("in_place", [True, False])
def test_place_model_for_uva_keeps_the_budget_off_the_gpu(in_place):
    torch.manual_seed(0)
    model = LlamaShaped(layers=8, dim=1024, heads=8, kv_heads=4, hidden=2048, vocab=VOCAB)
    reference_model = clone_model(model)
    total = sum(p.nbytes for p in model.parameters())
    options = {"uva": {"cpu_offload_gb": 0.5 * total / 2**30, "use_unified_addressing": in_place}}
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    offload_compiler.place_model(model, options, "cuda")
    placed = torch.cuda.max_memory_allocated() - base
    moved = sum(p.nbytes for p in model.parameters() if host_copy(p) is not None)
    compiled = torch.compile(model, backend="offload", options=options)
    ids = torch.randint(0, VOCAB, (1, 32), device="cuda")
    with torch.no_grad():
        got = compiled(ids).clone()
    _record(
        f"place_model_uva[in_place={in_place}]",
        {"model_bytes": total, "offloaded": moved, "peak_while_placing": placed},
    )
    assert moved >= 0.5 * total
    assert placed <= total - moved
    with torch.no_grad():
        expected = torch.compile(reference_model.cuda())(ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def _intervals(trace: dict, predicate) -> list[tuple[float, float, int]]:
    return [
        (e["ts"], e["ts"] + e["dur"], e.get("args", {}).get("stream", -1))
        for e in trace["traceEvents"]
        if e.get("ph") == "X" and predicate(e)
    ]


def _overlap(a: list[tuple[float, float, int]], b: list[tuple[float, float, int]]) -> float:
    """Time during which some interval of ``a`` and some interval of ``b`` both run."""
    merged: list[list[float]] = []
    for start, end, _ in sorted(b):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    total = 0.0
    for start, end, _ in a:
        for m_start, m_end in merged:
            total += max(0.0, min(end, m_end) - max(start, m_start))
    return total


@pytest.mark.parametrize(
    ("mode", "host_copies"),
    [("default", True), ("reduce-overhead", True), ("reduce-overhead", False)],
)
def test_copies_overlap_compute_on_a_side_stream(mode, host_copies, tmp_path):
    """Profile: H2D copies of the weights run on their own stream while GEMMs run; under
    reduce-overhead they are issued by the host after each replay (host copies) or replayed
    from the CUDA graph (``offload_host_copies=False``)."""
    torch.manual_seed(0)
    dim, layers = 4096, 8
    model = MLPStack(layers=layers, dim=dim).cuda()
    reference = torch.compile(clone_model(model), mode=mode)
    options = prefetch_options(1, 1, 2, mode=mode)
    options["prefetch"]["offload_host_copies"] = host_copies
    compiled = torch.compile(model, backend="offload", options=options)
    x = torch.randn(4096, dim, device="cuda")
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(compiled(x).clone(), reference(x).clone())

        def time_ms(fn) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                fn(x)
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 10

        t_offload, t_resident = time_ms(compiled), time_ms(reference)
        path = tmp_path / "trace.json"
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        ) as prof:
            for _ in range(3):
                compiled(x)
            torch.cuda.synchronize()
        prof.export_chrome_trace(str(path))
    trace = json.loads(path.read_text())
    copies = _intervals(
        trace, lambda e: e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "")
    )
    kernels = _intervals(trace, lambda e: e.get("cat") == "kernel")
    copy_streams = {s for *_, s in copies}
    kernel_streams = {s for *_, s in kernels}
    launches = {  # the CUDA runtime call behind each H2D copy, through its correlation id
        e["args"]["correlation"]: e["name"]
        for e in trace["traceEvents"]
        if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})
    }
    copy_launchers = {
        launches.get(e["args"].get("correlation"))
        for e in trace["traceEvents"]
        if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "")
    }
    copy_ms = sum(end - start for start, end, _ in copies) / 1e3
    overlap_ms = _overlap(copies, kernels) / 1e3
    layer_bytes = sum(p.nbytes for p in model.blocks[0].parameters())
    figures = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "mode": mode,
        "offloaded_ms_per_forward": t_offload,
        "resident_ms_per_forward": t_resident,
        "h2d_bytes_per_forward": layers * layer_bytes,
        "h2d_GBps": layers * layer_bytes / (copy_ms / 3) / 1e6 if copy_ms else None,
        "profiled_copy_ms": copy_ms,
        "copy_overlapped_with_kernels_ms": overlap_ms,
        "copy_streams": sorted(copy_streams),
        "kernel_streams": sorted(kernel_streams),
        "copy_launchers": sorted(map(str, copy_launchers)),
    }
    _record(f"overlap[{mode},host_copies={host_copies}]", figures)
    assert copies, "no H2D copies were profiled"
    captured = mode == "reduce-overhead" and not host_copies
    assert copy_launchers == {"cudaGraphLaunch" if captured else "cudaMemcpyAsync"}
    if not captured:
        # (in CUDA graph replays the trace gives the launch's stream, not the captured ones;
        # there the overlap itself shows the copies ran beside the kernels)
        assert copy_streams.isdisjoint(kernel_streams), "copies ran on a compute stream"
    assert overlap_ms > 0.5 * copy_ms, "copies mostly did not overlap compute"
    copy_bound_ms = layers * layer_bytes / (figures["h2d_GBps"] * 1e6)  # measured bandwidth
    assert t_offload < 1.05 * max(t_resident, copy_bound_ms)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_transformers_llama_equals_inductor(mode):
    """transformers' LlamaForCausalLM, untouched: 20 calls, poisoned slots, both modes."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=VOCAB,
    )
    model = transformers.LlamaForCausalLM(config).cuda().eval()
    reference = torch.compile(clone_model(model), mode=mode)
    offloaded = torch.compile(
        model, backend="offload", options=prefetch_options(2, 1, 2, mode=mode, poison_slots=True)
    )
    with torch.no_grad():
        for _ in range(20):
            ids = torch.randint(0, VOCAB, (2, 32), device="cuda")
            expected = reference(ids, use_cache=False).logits.clone()
            got = offloaded(ids, use_cache=False).logits.clone()
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    if mode == "reduce-overhead":
        assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


def _pinned_bytes() -> int:
    """Pinned host bytes in use in this process (the soak test watches them for leaks)."""
    stats = torch.cuda.host_memory_stats()
    return stats.get("allocated_bytes.current", stats.get("allocation.current", 0))


@pytest.mark.parametrize("dynamic", [True, None])
def test_new_shapes_do_not_grow_gpu_memory(dynamic):
    torch.manual_seed(0)
    model = LlamaShaped(layers=8, dim=512, heads=8, kv_heads=4, hidden=1024, vocab=VOCAB).cuda()
    reference = torch.compile(clone_model(model), dynamic=dynamic)
    offloaded = torch.compile(
        model, backend="offload", options=prefetch_options(2, 1, 2), dynamic=dynamic
    )
    sizes = []
    with torch.no_grad():
        for length in (8, 16, 24, 40, 8):
            ids = torch.randint(0, VOCAB, (1, length), device="cuda")
            torch.testing.assert_close(offloaded(ids), reference(ids), rtol=1e-4, atol=1e-4)
            torch.cuda.synchronize()
            sizes.append(torch.cuda.memory_allocated())
    _record(f"dynamic_shapes[{dynamic}]", {"memory_allocated_after_each_shape": sizes})
    assert max(sizes) - min(sizes) < 2**20  # activations come and go; no second weight copy


def test_two_models_each_with_own_pool_and_stream():
    torch.manual_seed(0)
    a = LlamaShaped(layers=4, dim=256, heads=8, kv_heads=4, hidden=512, vocab=VOCAB).cuda()
    b = MLPStack(layers=6, dim=512).cuda()
    ref_a, ref_b = torch.compile(clone_model(a)), torch.compile(clone_model(b))
    ca = torch.compile(a, backend="offload", options=prefetch_options(1, 1, 2, poison_slots=True))
    cb = torch.compile(b, backend="offload", options=prefetch_options(2, 1, 1, poison_slots=True))
    with torch.no_grad():
        for _ in range(10):
            ids, x = (
                torch.randint(0, VOCAB, (2, 16), device="cuda"),
                torch.randn(32, 512, device="cuda"),
            )
            torch.testing.assert_close(ca(ids), ref_a(ids), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(cb(x), ref_b(x), rtol=1e-4, atol=1e-4)
    ra, rb = _BY_STACK[a.layers], _BY_STACK[b.blocks]
    assert ra._order._copy_stream != rb._order._copy_stream
    assert ra.pool is not rb.pool


@pytest.mark.parametrize("which", ["gpt2", "mixtral"])
def test_transformers_gpt2_and_mixtral_experts(which):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if which == "gpt2":
        config = transformers.GPT2Config(
            n_embd=512, n_layer=8, n_head=8, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0
        )
        model, prefetch = transformers.GPT2LMHeadModel(config), prefetch_options(2, 1, 2)
    else:
        config = transformers.MixtralConfig(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            vocab_size=VOCAB,
            num_local_experts=8,
            num_experts_per_tok=2,
        )
        model = transformers.MixtralForCausalLM(config)
        prefetch = prefetch_options(1, 1, 2)
        prefetch["prefetch"]["offload_params"] = ["experts"]
    model = model.cuda().eval()
    reference = torch.compile(clone_model(model))
    offloaded = torch.compile(model, backend="offload", options={**prefetch, "poison_slots": True})
    with torch.no_grad():
        for _ in range(10):
            ids = torch.randint(0, VOCAB, (2, 32), device="cuda")
            torch.testing.assert_close(
                offloaded(ids, use_cache=False).logits,
                reference(ids, use_cache=False).logits,
                rtol=1e-4,
                atol=1e-4,
            )


def test_inputs_on_the_wrong_device_fail_and_leave_the_model_intact():
    torch.manual_seed(0)
    model = MLPStack(layers=4, dim=64).cuda()
    before = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    compiled = torch.compile(model, backend="offload", options=prefetch_options(1, 1, 1))
    with pytest.raises(Exception, match=r"(?i)device"), torch.no_grad():
        compiled(torch.randn(2, 64))  # CPU input, CUDA model
    after = model.state_dict()
    assert all(torch.equal(after[k].cpu(), v) for k, v in before.items())


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("in_place", [True, False])
def test_uva_equals_inductor_and_frees_gpu_memory(in_place, mode, caplog):
    """UVA: the chosen parameters leave the GPU; read in place (zero copy) or copied right
    before use; outputs equal plain Inductor over 20 calls."""
    import logging

    torch.manual_seed(0)
    model = LlamaShaped(layers=8, dim=512, heads=8, kv_heads=4, hidden=1024, vocab=VOCAB).cuda()
    reference = torch.compile(clone_model(model), mode=mode)
    ids = torch.randint(0, VOCAB, (2, 32), device="cuda")
    with torch.no_grad():
        reference(ids)  # cuBLAS workspace and the like, so the drop below is the weights
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    budget = 20 * 2**20
    options = {
        "uva": {"cpu_offload_gb": budget / 2**30, "use_unified_addressing": in_place},
        "mode": mode,
    }
    offloaded = torch.compile(model, backend="offload", options=options)
    with caplog.at_level(logging.DEBUG, logger="offload_compiler"), torch.no_grad():
        for i in range(20):
            x = ids if i == 0 else torch.randint(0, VOCAB, (2, 32), device="cuda")
            expected = reference(x).clone()
            torch.testing.assert_close(offloaded(x).clone(), expected, rtol=1e-4, atol=1e-4)
    torch.cuda.synchronize()
    moved = sum(p.nbytes for p in model.parameters() if host_copy(p) is not None)
    drop = before - torch.cuda.memory_allocated()
    graphs = [r.getMessage() for r in caplog.records if "rewritten graph" in r.getMessage()]
    fetches = sum(g.count("offload.fetch_param") for g in graphs)
    _record(
        f"uva[in_place={in_place},{mode}]",
        {"offloaded_bytes": moved, "gpu_memory_drop": drop, "fetch_ops": fetches},
    )
    assert moved >= budget
    assert (fetches == 0) == in_place
    assert all(host_copy(p).is_pinned() for p in model.parameters() if host_copy(p) is not None)
    if mode == "default":
        assert drop >= 0.95 * moved
    else:
        assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_per_param_streaming_equals_inductor_with_poisoned_slots(mode):
    reference, offloaded = _compiled_pair(mode, 1, 1, 1, True, offload_per_param=True)
    with torch.no_grad():
        for _ in range(25):
            ids = torch.randint(0, VOCAB, (2, 64), device="cuda")
            expected = reference(ids).clone()
            torch.testing.assert_close(offloaded(ids).clone(), expected, rtol=1e-4, atol=1e-4)
    if mode == "reduce-overhead":
        assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


def test_host_copies_interleaved_with_default_mode_and_a_new_shape():
    """Host copies (the default under reduce-overhead): one model compiled in both modes,
    sharing its runtime, called in turns with poisoned slots; a new input shape records a second
    graph midway. Every call equals Inductor: each replay finds the slots its program expects,
    whatever ran before it. The CUDA graphs hold no copy: they are host-issued memcpys."""
    torch.manual_seed(0)
    model = LlamaShaped(layers=8, dim=256, heads=8, kv_heads=4, hidden=512, vocab=VOCAB).cuda()
    reference = torch.compile(clone_model(model))
    # one configuration (one runtime) for both: reduce-overhead's CUDA graphs through Inductor's
    # config, as mode="reduce-overhead" sets it, active whenever that wrapper may compile
    options = prefetch_options(2, 1, 1, poison_slots=True)
    in_graphs = torch.compile(model, backend="offload", options=options)
    default = torch.compile(model, backend="offload", options=options)

    def graphs(ids: torch.Tensor) -> torch.Tensor:
        with torch._inductor.config.patch({"triton.cudagraphs": True}):
            return in_graphs(ids)

    with torch.no_grad():
        for i in range(30):
            tokens = 1 if i < 12 else (8 if i % 2 else 1)
            ids = torch.randint(0, VOCAB, (1, tokens), device="cuda")
            expected = reference(ids).clone()
            for compiled in (graphs, default) if i % 3 == 0 else (graphs,):
                torch.testing.assert_close(compiled(ids).clone(), expected, rtol=1e-4, atol=1e-4)
    runtime = _BY_STACK[model.layers]
    assert isinstance(runtime._order, CounterOrder)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    torch.cuda.synchronize()
    state = runtime._order.counters
    assert state.copies == state.device.landed.tolist()
    assert state.releases == state.device.released.tolist()


def test_captured_copies_option_equals_inductor():
    """``offload_host_copies=False``: the copies are captured into the CUDA graphs (memcpy
    nodes joined at the end), as before host copies existed."""
    reference, offloaded = _compiled_pair(
        "reduce-overhead", 2, 1, 1, True, offload_host_copies=False
    )
    with torch.no_grad():
        for _ in range(15):
            ids = torch.randint(0, VOCAB, (2, 16), device="cuda")
            expected = reference(ids).clone()
            torch.testing.assert_close(offloaded(ids).clone(), expected, rtol=1e-4, atol=1e-4)
    assert not isinstance(_BY_STACK[offloaded._orig_mod.layers]._order, CounterOrder)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
