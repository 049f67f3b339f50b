"""Shared test setup: the package's ops are registered before any test compiles a graph, and
every test starts and ends with a fresh Dynamo (no compiled frame leaks from one to the next)."""

import pytest
import torch

import offload_compiler  # noqa: F401


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
