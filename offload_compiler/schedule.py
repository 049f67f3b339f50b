"""What one compile will do, resolved once from the options, the Inductor mode and the device:
every choice that depends on more than one option is made here, and everything downstream reads
the resulting `Schedule` instead of the options.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch._inductor import list_mode_options

from .config import OffloadConfig
from .runtime.counter_device import counters_available

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Schedule:
    """The resolved plan of one compile. ``counter_ordering``: copies are ordered by counters
    (`runtime.counter_order`), not events, in every mode, so that compiles of one model in
    several modes share one runtime. ``host_issued_copies``: the CUDA graphs hold no copy; the
    host issues them after each replay. ``rejoin``: the graph joins its copy stream before it
    returns, as a capture requires."""

    backend: Literal["prefetch", "uva"] | None
    device: torch.device
    cudagraphs: bool
    per_param: bool
    counter_ordering: bool
    host_issued_copies: bool
    rejoin: bool
    poison_slots: bool
    config_hash: str
    inductor_patches: MappingProxyType[str, Any]

    @property
    def staged_inputs(self) -> bool:
        """Inputs cudagraph trees would copy are staged (`runtime.staging`)."""
        return self.cudagraphs and self.device.type == "cuda"


def resolve(config: OffloadConfig, mode: str | None, device: torch.device) -> Schedule:
    """The schedule of a compile of a graph whose parameters are on ``device``; ``mode`` is what
    torch.compile passed (``config.mode`` wins), mapped to options as Inductor's wrapper does."""
    patches = dict(list_mode_options(config.mode or mode or "default"))
    cudagraphs = bool(patches.get("triton.cudagraphs", torch._inductor.config.triton.cudagraphs))
    prefetch = config.prefetch
    counters = (
        device.type == "cuda" and prefetch.offload_host_copies and not prefetch.offload_capturable
    )
    if counters and (unavailable := counters_available(device)) is not None:
        log.info("offload: copies stay inside CUDA graphs (%s)", unavailable)
        counters = False
    host_issued = cudagraphs and counters
    if host_issued:
        # one CUDA graph per compiled graph: never a replay followed by another piece's recording
        # (which synchronizes the device before the replay's copies are issued)
        patches["graph_partition"] = False
    return Schedule(
        backend=config.selected_backend,
        device=device,
        cudagraphs=cudagraphs,
        per_param=prefetch.offload_per_param,
        counter_ordering=counters,
        host_issued_copies=host_issued,
        # with host-issued copies a CUDA graph holds no copy, so nothing needs joining at its end
        rejoin=(cudagraphs and not host_issued) or prefetch.offload_capturable,
        poison_slots=config.poison_slots,
        config_hash=config.compute_hash(),
        inductor_patches=MappingProxyType(patches),
    )
