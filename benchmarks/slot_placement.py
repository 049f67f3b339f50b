"""Where an offloaded model's slot buffers and weights landed in the CUDA caching allocator's
memory.

Session 16 found that a model built after another in a process can run its copies 2-10% slower
beside compute, whatever its mode and whatever pages its pinned host copies have
(docs/benchmarks.md). What differs between two models of one process is then the device memory
their copies write into: the slot buffers. `placement` reads it from the allocator's snapshot
(``torch.cuda.memory_snapshot()``): for each slot buffer, its segment (the ``cudaMalloc`` that
holds it), its offset there and from a 2 MiB boundary, and what else is live in that segment,
so that slow and fast models can be set side by side (`benchmarks.profile_offload` writes it to
``slots.json``, `benchmarks.offload_bench` to each cell's results).

Session 17 gave the slots segments of their own (a ``torch.cuda.MemPool``): every model's slots
then lay alike, and the reduce-overhead model built after a default one was still 3.3% slower
at 2048 tokens. `blocks_since` tells how many bytes a step (placing a model) put into segments
that existed before it, freed by an earlier model's warm-up, and how many into fresh ones.
Session 18 used it to rule out the weights as well: with every model's weights in fresh
segments (`offload_bench --fresh-memory`), that model stayed as slow, and a default model whose
weights went into reused segments was not slow.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

HUGE = 2 << 20  # the GPU's large page: cudaMalloc segments start on one


def _segment_of(address: int, segments: Sequence[dict]) -> dict | None:
    return next(
        (s for s in segments if s["address"] <= address < s["address"] + s["total_size"]), None
    )


def placement(tensors: Iterable[torch.Tensor], segments: Sequence[dict]) -> dict:
    """Where ``tensors`` lie among the snapshot's ``segments``: per tensor, its size, its
    offset in its segment and from the last 2 MiB boundary, the segment's size, pool and stream,
    and the other live blocks sharing the segment; and in sum, how many tensors have a segment
    to themselves and how many start on a 2 MiB boundary."""
    buffers = []
    for tensor in tensors:
        address, nbytes = tensor.data_ptr(), tensor.untyped_storage().nbytes()
        segment = _segment_of(address, segments)
        if segment is None:
            raise ValueError(f"no allocator segment holds the tensor at {address:#x}")
        others = [
            b
            for b in segment.get("blocks", [])
            if b["state"] == "active_allocated" and b.get("address") != address
        ]
        buffers.append(
            {
                "nbytes": nbytes,
                "offset_in_segment": address - segment["address"],
                "offset_from_2MiB": address % HUGE,
                "segment_address": segment["address"],
                "segment_bytes": segment["total_size"],
                "segment_pool": list(segment.get("segment_pool_id") or ()),
                "segment_stream": segment.get("stream"),
                "other_live_blocks": len(others),
                "other_live_bytes": sum(b["size"] for b in others),
            }
        )
    return {
        "buffers": len(buffers),
        "alone_in_segment": sum(b["other_live_blocks"] == 0 for b in buffers),
        "on_2MiB_boundary": sum(b["offset_from_2MiB"] == 0 for b in buffers),
        "segments": len({b["segment_address"] for b in buffers}),
        "by_buffer": buffers,
    }


def runtime_placement(runtime) -> dict:
    """`placement` of an `OffloadRuntime`'s slot buffers in the allocator's current snapshot."""
    return placement(runtime.pool.buffers(), torch.cuda.memory_snapshot())


def _active(segments: Sequence[dict]) -> dict[int, tuple[int, int]]:
    """Active block address -> (its size, its segment's address)."""
    return {
        b["address"]: (b["size"], s["address"])
        for s in segments
        for b in s.get("blocks", [])
        if b["state"] == "active_allocated"
    }


def blocks_since(before: Sequence[dict], after: Sequence[dict]) -> dict:
    """The blocks live in snapshot ``after`` and not in ``before``: their bytes in segments that
    ``before`` already had (memory the process freed earlier, reused) and in new segments."""
    old_segments = {s["address"] for s in before}
    was_active = _active(before)
    new = [
        (size, segment)
        for address, (size, segment) in _active(after).items()
        if address not in was_active
    ]
    return {
        "blocks": len(new),
        "recycled_bytes": sum(size for size, segment in new if segment in old_segments),
        "fresh_bytes": sum(size for size, segment in new if segment not in old_segments),
    }
