"""What a user sees: one INFO summary per compiled graph, and the rewritten graph for tlparse."""

from __future__ import annotations

import logging
import re

import torch

from tests.cache_probe import probe
from tests.models import MLPStack


def test_one_info_summary_per_compiled_graph(caplog):
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = MLPStack(layers=4, dim=16, graph_break_after=1)  # two graphs
    options = {
        "prefetch": {"offload_group_size": 2, "offload_num_in_group": 1, "offload_prefetch_step": 1}
    }
    compiled = torch.compile(model, backend="offload", options=options)
    with caplog.at_level(logging.INFO, logger="offload_compiler"), torch.no_grad():
        for _ in range(3):
            compiled(torch.randn(2, 16))
    torch._dynamo.reset()
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(lines) == 2, lines
    pattern = (
        r"offload: blocks: 2 of 4 layers offloaded \(1,3\), [\d.]+ MiB in CPU host memory, "
        r"1 slots \([\d.]+ MiB on cpu\), prefetch_step 1; this graph reads 1 of them"
    )
    assert all(re.fullmatch(pattern, line) for line in lines), lines


def test_rewritten_graph_is_a_tlparse_artifact(tmp_path):
    probe(1, TORCH_TRACE=str(tmp_path / "trace"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "c"))
    logs = "".join(p.read_text() for p in (tmp_path / "trace").glob("*"))
    assert '"name": "offload_rewritten_graph"' in logs
    assert "torch.ops.offload.wait_prefetch.default" in logs
