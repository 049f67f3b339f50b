"""Benchmarks of the offload backend (see offload_bench.py)."""
