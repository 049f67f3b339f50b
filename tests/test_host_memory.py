"""Host copies and pinned blocks (CPU side; pinned memory and device views are tested on GPU)."""

from __future__ import annotations

import itertools

import pytest
import torch

from offload_compiler.host_memory import (
    PinnedArena,
    host_copy,
    offload_parameters,
    plan_pinned_blocks,
)


def test_cpu_offload_keeps_the_parameter_as_its_own_host_copy():
    param = torch.nn.Parameter(torch.randn(3, 3))
    assert host_copy(param) is None
    (host,) = offload_parameters([param], torch.device("cpu"))
    assert host.data_ptr() == param.data_ptr()
    assert offload_parameters([param, param], torch.device("cpu")) == [host, host]  # idempotent
    assert host_copy(param) is host


def test_offloading_to_an_unsupported_device_is_refused():
    with pytest.raises(ValueError, match="not supported"):
        offload_parameters([torch.nn.Parameter(torch.randn(2))], torch.device("meta"))


MiB = 1 << 20
# One Llama-3-8B decoder layer's parameters in bf16: q, k, v, o, gate, up, down, two norms.
LLAMA_8B_LAYER = [32 * MiB, 8 * MiB, 8 * MiB, 32 * MiB, 112 * MiB, 112 * MiB, 112 * MiB, 8192, 8192]


def _check_layout(sizes, plan, align=4096):
    """Every request lies inside its block, page-aligned, and no two overlap; blocks are powers
    of two."""
    assert len(plan.places) == len(sizes)
    assert all(size & (size - 1) == 0 for size in plan.block_bytes)
    spans = sorted(
        (b, off, off + max(size, 1)) for size, (b, off) in zip(sizes, plan.places, strict=True)
    )
    for (b, _, end), (b2, start2, _) in itertools.pairwise(spans):
        assert b != b2 or end <= start2
    for b, start, end in spans:
        assert start % align == 0 and end <= plan.block_bytes[b]


def test_pinned_blocks_pack_a_llama_model_with_little_waste():
    sizes = LLAMA_8B_LAYER * 32
    plan = plan_pinned_blocks(sizes)
    _check_layout(sizes, plan)
    one_by_one = sum(1 << (s - 1).bit_length() for s in sizes)  # the pinned allocator's rounding
    assert one_by_one / sum(sizes) > 1.10  # what packing saves
    assert sum(plan.block_bytes) / sum(sizes) < 1.01
    assert max(plan.block_bytes) == 1 << 30


def test_pinned_blocks_give_a_large_request_a_block_of_its_own_whose_tail_others_use():
    sizes = [3 << 30, 5000, 0]  # 3 GiB (above the 1 GiB block), a few bytes, an empty tensor
    plan = plan_pinned_blocks(sizes)
    _check_layout(sizes, plan)
    assert plan.block_bytes == (4 << 30,)
    assert [block for block, _ in plan.places] == [0, 0, 0]


def test_pinned_blocks_shrink_to_what_is_left_to_place():
    sizes = [12288, 10, 0, 168]  # padded to pages: 3 + 1 + 1 + 1 pages
    plan = plan_pinned_blocks(sizes)
    _check_layout(sizes, plan)
    assert plan.block_bytes == (16384, 8192)  # not one 32 KiB block for 24 KiB


def test_pinned_blocks_of_one_request_are_its_size_rounded_to_a_power_of_two():
    assert plan_pinned_blocks([112 * MiB]).block_bytes == (128 * MiB,)
    assert plan_pinned_blocks([]).block_bytes == ()


def test_arena_tensors_are_disjoint_views_with_the_requested_layout():
    tensors = [
        torch.randn(64, 48).t(),  # strides (1, 64)
        torch.randn(5, dtype=torch.bfloat16),
        torch.empty(0, 3),
        torch.randint(0, 9, (7, 3), dtype=torch.int64),
    ]
    arena = PinnedArena(tensors, allocate=lambda n: torch.zeros(n, dtype=torch.uint8))
    views = [arena.empty(i) for i in range(len(tensors))]
    for view, tensor in zip(views, tensors, strict=True):
        assert (view.shape, view.stride(), view.dtype) == (
            tensor.shape,
            tensor.stride(),
            tensor.dtype,
        )
        view.copy_(tensor)
    for view, tensor in zip(views, tensors, strict=True):  # no copy overwrote another's bytes
        assert torch.equal(view, tensor)
    blocks = {b.untyped_storage().data_ptr() for b in arena.blocks}
    assert {v.untyped_storage().data_ptr() for v in views} <= blocks  # views of the blocks
    assert len(blocks) < len(tensors)
