"""Run in a fresh process (`probe`): compile an offloaded model, print cache counters.

Usage: python -m tests.cache_probe STEP  (prints one JSON line)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

import offload_compiler  # noqa: F401
from tests.models import MLPStack, clone_model


def main(step: int) -> None:
    torch.manual_seed(0)
    model = MLPStack(layers=4, dim=16)
    reference = clone_model(model)
    options = {
        "prefetch": {
            "offload_group_size": 1,
            "offload_num_in_group": 1,
            "offload_prefetch_step": step,
        }
    }
    compiled = torch.compile(model, backend="offload", options=options)
    x = torch.randn(3, 16)
    start = time.perf_counter()
    with torch.no_grad():
        out = compiled(x)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        error = (out - reference(x)).abs().max().item()
    print(
        json.dumps(
            {
                "fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
                "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"],
                "autograd_cache_hit": counters["aot_autograd"]["autograd_cache_hit"],
                "seconds": seconds,
                "error": error,
            }
        )
    )


def probe(step: int, **env: str) -> dict:
    """Run this module in a fresh Python with ``env`` added; its JSON line, parsed."""
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-m", "tests.cache_probe", str(step)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(repo), **env},
        cwd=repo,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main(int(sys.argv[1]))
