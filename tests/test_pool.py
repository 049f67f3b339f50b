"""Slot buffers and host copies (CPU side; pinned memory and device views are tested on GPU)."""

from __future__ import annotations

import pytest
import torch

from offload_compiler.pool import SlotKey, SlotPool, host_copy, offload_parameter


def test_slot_pool_shares_a_buffer_per_key_and_slot():
    pool = SlotPool(2, torch.device("cpu"))
    weight = torch.randn(4, 3)
    key = SlotKey.of("fc.weight", weight)
    a, b = pool.buffer(0, key), pool.buffer(0, key)
    assert a is b
    assert pool.buffer(1, key) is not a
    other = pool.buffer(0, SlotKey.of("fc.bias", torch.randn(4)))
    assert other.data_ptr() != a.data_ptr()
    assert pool.nbytes == 2 * weight.nbytes + 4 * 4


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


def test_cpu_offload_keeps_the_parameter_as_its_own_host_copy():
    param = torch.nn.Parameter(torch.randn(3, 3))
    assert host_copy(param) is None
    host = offload_parameter(param, torch.device("cpu"))
    assert host.data_ptr() == param.data_ptr()
    assert offload_parameter(param, torch.device("cpu")) is host  # idempotent
    assert host_copy(param) is host


def test_offloading_to_an_unsupported_device_is_refused():
    with pytest.raises(ValueError, match="not supported"):
        offload_parameter(torch.nn.Parameter(torch.randn(2)), torch.device("meta"))
