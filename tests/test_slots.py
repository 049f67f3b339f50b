"""Slot buffers: one per key and slot, with the parameter's strides."""

from __future__ import annotations

import torch

from offload_compiler.runtime.slots import SlotKey, SlotPool


def test_slot_pool_shares_a_buffer_per_key_and_slot():
    pool = SlotPool(2, torch.device("cpu"))
    weight = torch.randn(4, 3)
    key = SlotKey.of("fc.weight", weight)
    a, b = pool.buffer(0, key), pool.buffer(0, key)
    assert a is b
    b2 = pool.buffer(1, key)
    assert b2 is not a
    other = pool.buffer(0, SlotKey.of("fc.bias", torch.randn(4)))
    assert other.data_ptr() != a.data_ptr()
    assert pool.nbytes == 2 * weight.nbytes + 4 * 4
    assert [t.data_ptr() for t in pool.buffers()] == [t.data_ptr() for t in (a, other, b2)]


def test_slot_buffers_keep_strides():
    transposed = torch.randn(3, 5).t()  # stride (1, 5)
    key = SlotKey.of("w", transposed)
    buf = SlotPool(1, torch.device("cpu")).buffer(0, key)
    assert buf.stride() == transposed.stride() and buf.shape == transposed.shape
    buf.copy_(transposed)
    assert torch.equal(buf, transposed)


def test_keys_differ_by_dtype_shape_and_stride():
    base = torch.randn(4, 4)
    keys = {
        SlotKey.of("w", base),
        SlotKey.of("w", base.half()),
        SlotKey.of("w", base.t()),
        SlotKey.of("w", torch.randn(4, 5)),
    }
    assert len(keys) == 4
