"""The soak test (marked ``soak``, not ``cuda``, so that the cuda suite stays short): run it on
a CUDA machine with ``python -m pytest -m soak tests``."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from tests.test_gpu import VOCAB, _compiled_pair, _pinned_bytes, _record

pytestmark = [
    pytest.mark.soak,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_soak_1000_replays_memory_flat():
    """1000 reduce-overhead replays with fresh inputs: equal outputs, no memory growth."""
    reference, offloaded = _compiled_pair("reduce-overhead", 2, 1, 2, poison=True)
    inputs = torch.randint(0, VOCAB, (1000, 2, 32), device="cuda")
    worst = 0.0
    with torch.no_grad():
        for i in range(1000):
            expected = reference(inputs[i]).clone()
            got = offloaded(inputs[i])
            worst = max(worst, (got - expected).abs().max().item())
            if i == 9:
                torch.cuda.synchronize()
                gpu_early, pinned_early = torch.cuda.memory_allocated(), _pinned_bytes()
    torch.cuda.synchronize()
    gpu_late, pinned_late = torch.cuda.memory_allocated(), _pinned_bytes()
    _record(
        "soak_1000",
        {
            "max_abs_diff": worst,
            "gpu_bytes_after_10": gpu_early,
            "gpu_bytes_after_1000": gpu_late,
            "pinned_bytes_after_10": pinned_early,
            "pinned_bytes_after_1000": pinned_late,
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
        },
    )
    assert worst <= 1e-4
    assert gpu_late == gpu_early and pinned_late == pinned_early
    assert counters["inductor"]["cudagraph_skips"] == 0
