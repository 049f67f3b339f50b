"""Helpers shared by the tests."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def prefetch_options(
    group: int = 1, num: int = 1, step: int = 1, offload_params: Iterable[str] = (), **top: Any
) -> dict:
    """Backend options for prefetch offloading; ``top`` adds top-level keys (mode, ...)."""
    return {
        "prefetch": {
            "offload_group_size": group,
            "offload_num_in_group": num,
            "offload_prefetch_step": step,
            "offload_params": list(offload_params),
        },
        **top,
    }
