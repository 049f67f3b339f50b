"""UVA's fallback where the device cannot (or should not) read host memory in place."""

from __future__ import annotations

import torch


class HostFetcher:
    """Host copies a graph copies to the device right before each use (op fetch_param), on the
    current stream, so ordered with the kernels around it; from pinned memory, so the host does
    not block, and capturable (the destination comes from the graph's memory pool)."""

    def __init__(self, fetcher_id: int, hosts: list[torch.Tensor], device: torch.device) -> None:
        self.id = fetcher_id
        self.hosts = hosts
        self.device = device

    def fetch(self, index: int) -> torch.Tensor:
        return self.empty_like(index).copy_(self.hosts[index], non_blocking=True)

    def empty_like(self, index: int) -> torch.Tensor:
        """An uninitialised tensor like what ``fetch`` returns (also its fake for tracing)."""
        host = self.hosts[index]
        return torch.empty_strided(host.shape, host.stride(), dtype=host.dtype, device=self.device)
