"""Compile caches across processes: same config hits, a changed config misses, never stale."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _probe(step: int, cache_dir: Path) -> dict:
    env = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(cache_dir),
        "PYTHONPATH": str(REPO),
    }
    out = subprocess.run(
        [sys.executable, "-m", "tests.cache_probe", str(step)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_same_config_hits_changed_config_misses(tmp_path):
    cold = _probe(1, tmp_path)
    warm = _probe(1, tmp_path)
    other = _probe(2, tmp_path)
    assert cold["fxgraph_cache_hit"] == 0 and cold["fxgraph_cache_miss"] >= 1
    assert warm["fxgraph_cache_hit"] >= 1 and warm["autograd_cache_hit"] >= 1
    assert warm["seconds"] < cold["seconds"]
    assert other["fxgraph_cache_miss"] >= 1 and other["autograd_cache_hit"] == 0
    for run in (cold, warm, other):
        assert run["error"] <= 1e-5, run  # a cached graph computes the right thing
