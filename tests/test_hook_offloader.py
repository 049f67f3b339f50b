"""benchmarks.hook_offloader: the patched forwards compute what the model computes."""

from __future__ import annotations

import copy

import pytest
import torch

from benchmarks.hook_offloader import HookPrefetchOffloader, pinned_copy
from offload_compiler.llama import LlamaShaped


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_offloaded_layers_sharing_one_slot_match_the_model(compiled):
    """Layers 1 and 3 of 4 (group 2, one offloaded per group) share one slot (step 1): each
    reads its own weights only if its copy lands in the slot before it runs."""
    torch.manual_seed(0)
    model = LlamaShaped(layers=4, dim=32, heads=4, kv_heads=2, hidden=64, vocab=64).eval()
    reference = copy.deepcopy(model)
    offloader = HookPrefetchOffloader(model.layers, 2, 1, 1, torch.device("cpu"))
    assert offloader.indices == [1, 3]
    assert model.layers[1].q_proj.weight.data_ptr() == model.layers[3].q_proj.weight.data_ptr()
    assert model.layers[0].q_proj.weight.data_ptr() != model.layers[2].q_proj.weight.data_ptr()
    layer_bytes = sum(p.nbytes for p in reference.layers[1].parameters())
    assert offloader.offloaded_bytes == 2 * layer_bytes
    assert sum(t.nbytes for t in offloader.host_tensors) == offloader.offloaded_bytes
    run = torch.compile(model) if compiled else model
    with torch.no_grad():
        for tokens in (5, 9, 5):
            ids = torch.randint(0, 64, (1, tokens))
            torch.testing.assert_close(run(ids), reference(ids))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_copy_keeps_values_shape_and_strides():
    tensor = torch.arange(12.0).reshape(3, 4).t()
    host = pinned_copy(tensor)
    assert host.is_pinned()
    assert host.stride() == tensor.stride()
    torch.testing.assert_close(host, tensor)
