"""Compile caches across processes: same config hits, a changed config misses, never stale."""

from __future__ import annotations

from tests.cache_probe import probe


def test_same_config_hits_changed_config_misses(tmp_path):
    cache = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    cold = probe(1, **cache)
    warm = probe(1, **cache)
    other = probe(2, **cache)
    assert cold["fxgraph_cache_hit"] == 0 and cold["fxgraph_cache_miss"] >= 1
    assert warm["fxgraph_cache_hit"] >= 1 and warm["autograd_cache_hit"] >= 1
    assert warm["seconds"] < cold["seconds"]
    assert other["fxgraph_cache_miss"] >= 1 and other["autograd_cache_hit"] == 0
    for run in (cold, warm, other):
        assert run["error"] <= 1e-5, run  # a cached graph computes the right thing
