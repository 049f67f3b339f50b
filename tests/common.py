"""Helpers shared by the tests."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def prefetch_options(
    group: int = 1,
    num: int = 1,
    step: int = 1,
    offload_params: Iterable[str] = (),
    per_param: bool | None = None,
    **top: Any,
) -> dict:
    """Backend options for prefetch offloading; ``per_param`` sets ``offload_per_param`` (the
    default applies when None); ``top`` adds top-level keys (mode, ...)."""
    prefetch = {
        "offload_group_size": group,
        "offload_num_in_group": num,
        "offload_prefetch_step": step,
        "offload_params": list(offload_params),
    }
    if per_param is not None:
        prefetch["offload_per_param"] = per_param
    return {"prefetch": prefetch, **top}


def cpu_schedule(prefetch: Any = None, **top: Any):
    """The schedule of a CPU compile with this prefetch config (a `PrefetchOffloadConfig`)."""
    import torch

    from offload_compiler import OffloadConfig
    from offload_compiler.schedule import resolve

    config = OffloadConfig(prefetch=prefetch, **top) if prefetch is not None else OffloadConfig()
    return resolve(config, None, torch.device("cpu"))
