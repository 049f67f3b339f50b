"""Loading a safetensors checkpoint straight into the offloaded placement (CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from offload_compiler.host_memory import host_copy
from offload_compiler.loading import init_empty_weights, load_checkpoint
from offload_compiler.safetensors_files import CheckpointError
from tests.common import prefetch_options
from tests.models import LlamaShaped

SIZES = {"layers": 4, "dim": 32, "heads": 4, "kv_heads": 2, "hidden": 64, "vocab": 64}


def _source() -> LlamaShaped:
    torch.manual_seed(0)
    return LlamaShaped(**SIZES).eval()


def _empty() -> LlamaShaped:
    with init_empty_weights():
        return LlamaShaped(**SIZES).eval()


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def test_a_loaded_model_equals_the_saved_one_and_runs_offloaded(tmp_path):
    source = _source()
    save_file(_tensors(source), tmp_path / "model.safetensors")
    options = prefetch_options(2, 1, 1)
    model = load_checkpoint(_empty(), tmp_path, options, "cpu")
    for name, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    offloaded = model.layers[1].q_proj.weight
    assert host_copy(offloaded) is not None  # the backend finds the host copy made here
    assert type(offloaded).__name__ == "OffloadedParameter"
    assert host_copy(model.layers[0].q_proj.weight) is None  # resident
    compiled = torch.compile(model, backend="offload", options=options)
    ids = torch.randint(0, SIZES["vocab"], (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), source(ids), rtol=1e-5, atol=1e-5)


def test_shards_named_by_an_index_load_like_one_file(tmp_path):
    source = _source()
    tensors = _tensors(source)
    names = sorted(tensors)
    shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2 :]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, tmp_path / file)
    weight_map = {n: file for file, part in shards.items() for n in part}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = load_checkpoint(_empty(), tmp_path, prefetch_options(1, 1, 1), "cpu")
    assert all(torch.equal(model.state_dict()[n], v) for n, v in tensors.items())


def test_tied_weights_stay_tied_from_one_stored_name(tmp_path):
    source = _source()
    source.lm_head.weight = source.embed_tokens.weight
    tensors = _tensors(source)
    del tensors["lm_head.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    model = _empty()
    model.lm_head.weight = model.embed_tokens.weight
    load_checkpoint(model, tmp_path, prefetch_options(2, 1, 1), "cpu")
    assert model.lm_head.weight is model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, source.embed_tokens.weight)


def test_a_requested_dtype_converts_floating_point_tensors(tmp_path):
    save_file(_tensors(_source()), tmp_path / "model.safetensors")
    model = load_checkpoint(_empty(), tmp_path, prefetch_options(2, 1, 1), "cpu", torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert torch.equal(model.layers[1].q_proj.weight, _source().layers[1].q_proj.weight.double())


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("missing", r"missing from the checkpoint: layers\.2\.up_proj\.weight"),
        ("unexpected", r"not in the model: extra\.weight"),
        ("shape", r"shapes or dtypes differ: norm\.weight: stored \[31\], model \[32\]"),
        ("dtype", r"dtypes differ: norm\.weight: stored torch\.int32, model torch\.float32"),
    ],
)
def test_a_mismatch_is_named_before_the_model_is_touched(tmp_path, damage, message):
    tensors = _tensors(_source())
    if damage == "missing":
        del tensors["layers.2.up_proj.weight"]
    elif damage == "unexpected":
        tensors["extra.weight"] = torch.zeros(3)
    elif damage == "shape":
        tensors["norm.weight"] = torch.zeros(31)
    else:
        tensors["norm.weight"] = torch.zeros(32, dtype=torch.int32)
    save_file(tensors, tmp_path / "model.safetensors")
    model = _empty()
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(model, tmp_path, prefetch_options(2, 1, 1), "cpu")
    assert all(p.is_meta for p in model.parameters())  # nothing half-placed


def test_a_load_that_cannot_fit_in_host_memory_is_refused_naming_both_sizes(tmp_path, monkeypatch):
    from offload_compiler import loading

    save_file(_tensors(_source()), tmp_path / "model.safetensors")
    monkeypatch.setattr(loading, "_available_host_bytes", lambda: 2**20)
    model = _empty()
    with pytest.raises(MemoryError, match=r"needs 0\.\d+ GiB .*, 0\.00 GiB are available"):
        load_checkpoint(model, tmp_path, prefetch_options(2, 1, 1), "cpu")
    assert all(p.is_meta for p in model.parameters())


def test_the_report_gives_bytes_speed_and_peaks(tmp_path):
    source = _source()
    save_file(_tensors(source), tmp_path / "model.safetensors")
    report: dict[str, float] = {}
    load_checkpoint(_empty(), tmp_path, prefetch_options(2, 1, 1), "cpu", report=report)
    assert report["bytes"] == sum(p.nbytes for p in source.parameters())
    assert report["seconds"] > 0 and report["GBps"] == pytest.approx(
        report["bytes"] / report["seconds"] / 1e9
    )
    assert report["host_peak_bytes"] >= 0 and report["gpu_peak_bytes"] == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_load_puts_offloaded_weights_in_pinned_memory_and_only_the_rest_on_the_gpu(tmp_path):
    source = _source().to(torch.bfloat16)
    save_file(_tensors(source), tmp_path / "model.safetensors")
    options = prefetch_options(2, 1, 1)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    model = load_checkpoint(_empty(), tmp_path, options, "cuda")
    torch.cuda.synchronize()
    offloaded = [p for i in (1, 3) for p in model.layers[i].parameters()]
    resident = [p for p in model.parameters() if all(p is not q for q in offloaded)]
    used, resident_bytes = torch.cuda.memory_allocated() - before, sum(p.nbytes for p in resident)
    assert resident_bytes <= used <= resident_bytes + 512 * len(resident)  # allocator rounding
    for param in offloaded:
        host = host_copy(param)
        assert host.is_pinned() and host.data_ptr() == param.data_ptr()
        assert param.device.type == "cuda"
    reference = torch.compile(source.cuda())  # Inductor, as the offloaded graph is compiled
    compiled = torch.compile(model, backend="offload", options=options)
    ids = torch.randint(0, SIZES["vocab"], (1, 16), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), reference(ids), rtol=1e-2, atol=1e-2)


def test_a_second_model_loads_after_the_first_is_dropped_and_its_memory_is_freed(tmp_path):
    """Dropping a loaded, compiled and called model frees its host copies (CPU: host bytes),
    so loading the next one needs no more than the first did."""
    import gc
    import weakref

    import offload_compiler

    save_file(_tensors(_source()), tmp_path / "model.safetensors")
    options = prefetch_options(2, 1, 1)
    held = []
    for _ in range(2):
        model = load_checkpoint(_empty(), tmp_path, options, "cpu")
        compiled = torch.compile(model, backend="offload", options=options)
        with torch.no_grad():
            compiled(torch.randint(0, SIZES["vocab"], (1, 4)))
        (stack,) = offload_compiler.offloaded_stacks(model)
        held.append([weakref.ref(t) for t in stack.host_tensors])
        del model, compiled, stack
        for _ in range(2):
            gc.collect()
        assert all(ref() is None for ref in held[-1])  # nothing of it stays


_GPU_SIZES = {**SIZES, "dim": 512, "hidden": 1024, "vocab": 512}


def _gpu_checkpoint(path) -> None:
    torch.manual_seed(0)
    save_file(_tensors(LlamaShaped(**_GPU_SIZES).to(torch.bfloat16)), path / "model.safetensors")


def _load_gpu(path) -> torch.nn.Module:
    with init_empty_weights():
        empty = LlamaShaped(**_GPU_SIZES).eval()
    return load_checkpoint(empty, path, prefetch_options(2, 1, 1), "cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_a_second_model_fits_the_memory_of_the_first_once_it_is_dropped(tmp_path):
    """GPU memory and pinned host memory of a dropped model are freed: a second load fits under
    a per-process cap that leaves no room for two, and the first's host copies are gone."""
    import gc
    import weakref

    import offload_compiler

    _gpu_checkpoint(tmp_path)
    options = prefetch_options(2, 1, 1)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    model = _load_gpu(tmp_path)
    compiled = torch.compile(model, backend="offload", options=options)
    with torch.no_grad():
        compiled(torch.randint(0, _GPU_SIZES["vocab"], (1, 8), device="cuda"))
    torch.cuda.synchronize()
    used = torch.cuda.memory_allocated() - base
    (stack,) = offload_compiler.offloaded_stacks(model)
    hosts = [weakref.ref(t) for t in stack.host_tensors]
    del model, compiled, stack
    gc.collect()
    assert all(ref() is None for ref in hosts)  # pinned host copies freed
    assert torch.cuda.memory_allocated() - base < used // 8  # slots and resident weights freed
    total = torch.cuda.mem_get_info()[1]
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated() + used * 1.5) / total)
    try:
        second = _load_gpu(tmp_path)
        assert second.layers[0].q_proj.weight.device.type == "cuda"
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_a_resident_part_over_the_process_memory_cap_is_refused_before_placing(tmp_path):
    _gpu_checkpoint(tmp_path)
    total = torch.cuda.mem_get_info()[1]
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated() + 2**20) / total)
    try:
        with init_empty_weights():
            model = LlamaShaped(**_GPU_SIZES).eval()
        with pytest.raises(MemoryError, match=r"needs \d+\.\d+ GiB, .* memory fraction"):
            load_checkpoint(model, tmp_path, prefetch_options(2, 1, 1), "cuda")
        assert all(p.is_meta for p in model.parameters())
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def test_a_budget_is_planned_on_the_sizes_the_load_places(tmp_path, monkeypatch):
    """A model built in fp32 on the meta device, a bf16 checkpoint and a budget: the plan
    counts bf16 bytes, the layers it picks are the ones loaded into host memory."""
    import offload_compiler
    from offload_compiler import costs
    from offload_compiler.planner import Costs

    given = Costs(h2d_gbps=50.0, tflops=400.0, hbm_gbps=3000.0, source="given")
    monkeypatch.setattr(costs, "machine_costs", lambda device: given)
    source = _source().to(torch.bfloat16)
    save_file(_tensors(source), tmp_path / "model.safetensors")
    budget = int(sum(p.nbytes for p in source.parameters()) * 0.7)
    options = {"gpu_memory_budget": budget, "plan_tokens": (1, 4)}
    expected = offload_compiler.plan(source, budget, (1, 4), device="cpu", costs=given)
    model = load_checkpoint(_empty(), tmp_path, options, "cpu")
    layers = expected.config.prefetch.offload_layers
    assert 0 < len(layers) < SIZES["layers"]
    for index in range(SIZES["layers"]):
        offloaded = host_copy(model.layers[index].q_proj.weight) is not None
        assert offloaded == (index in layers), index
