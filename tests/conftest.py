"""Shared test setup: the package's ops are registered before any test compiles a graph."""

import offload_compiler  # noqa: F401
