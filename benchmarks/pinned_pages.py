"""How the host memory behind the prefetch copies is paged, and what that costs under load.

A host-to-device copy reads pinned memory through the GPU's address translation: the fewer and
larger the pages behind a pinned buffer, the fewer translations the copy engine needs, and the
less it loses when compute kernels compete for the same translation hardware. Tools for
`benchmarks.profile_offload`:

- `contended_copy_ms`: copies timed alone and while weight-streaming matmuls run on another
  stream (as an offloaded forward runs them), into a scratch buffer or into given destinations;
- `huge_pinned` and `rehome_host_copies`: an offloaded model's host copies moved into pinned
  memory backed by 2 MiB transparent huge pages (``mmap`` + ``madvise`` + ``cudaHostRegister``),
  to compare with the driver's own pinned allocations;
- `huge_page_share`: how much of a host buffer the kernel backs with huge pages (smaps).
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

HUGE = 2 << 20

# the mappings (and their registrations) of every huge pinned buffer, for the process's life
_KEPT: list[tuple[mmap.mmap, torch.Tensor]] = []


def transparent_huge_pages() -> dict[str, str]:
    """The kernel's THP settings (the bracketed word of each file)."""
    settings = {}
    for name in ("enabled", "defrag"):
        path = Path("/sys/kernel/mm/transparent_hugepage") / name
        text = path.read_text() if path.exists() else ""
        chosen = text[text.find("[") + 1 : text.find("]")] if "[" in text else text.strip()
        settings[name] = chosen
    return settings


def huge_pinned(nbytes: int) -> torch.Tensor:
    """``nbytes`` of page-locked host memory from a 2 MiB-aligned anonymous mapping advised to
    use transparent huge pages, registered with CUDA (kept for the life of the process)."""
    size = -(-nbytes // HUGE) * HUGE
    buffer = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    offset = (-base) % HUGE
    buffer.madvise(mmap.MADV_HUGEPAGE, offset, size)
    tensor = torch.frombuffer(buffer, dtype=torch.uint8, count=size, offset=offset)
    tensor.fill_(0)  # fault the pages in now, while the advice holds
    result = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), size, 0)
    if int(result) != 0:
        raise RuntimeError(f"cudaHostRegister failed: {result}")
    _KEPT.append((buffer, tensor))
    return tensor[:nbytes]


def huge_page_share(tensors: Sequence[torch.Tensor]) -> dict[str, int | list[str]]:
    """kB resident and kB in anonymous huge pages of the mappings holding ``tensors`` (Linux
    smaps; memory pinned by the CUDA driver itself shows as a device mapping, no huge pages)."""
    spans = [(t.data_ptr(), t.data_ptr() + t.untyped_storage().nbytes()) for t in tensors]
    rss = huge = 0
    kinds = set()
    current = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head[0].split("-")) == 2 and ":" not in head[0]:
            low, high = (int(x, 16) for x in head[0].split("-"))
            current = any(s < high and e > low for s, e in spans)
            if current:
                kinds.add(head[5] if len(head) > 5 else "[anon]")
        elif current and head and head[0] in ("Rss:", "AnonHugePages:"):
            if head[0] == "Rss:":
                rss += int(head[1])
            else:
                huge += int(head[1])
    return {"rss_kB": rss, "anon_huge_kB": huge, "mappings": sorted(kinds)}


def torch_pinned(nbytes: int) -> torch.Tensor:
    """``nbytes`` of pinned host memory from PyTorch's allocator (the CUDA driver's pages)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def rehome_host_copies(
    runtime, allocate: Callable[[int], torch.Tensor] = huge_pinned
) -> list[torch.Tensor]:
    """Move an `OffloadRuntime`'s host copies into memory from ``allocate`` (host copies only:
    the runtime then issues its copies from the new buffers; a CUDA graph that captured copies
    would still read the old ones). Returns the new host tensors."""
    if not runtime.host_copies:
        raise ValueError("only a runtime with host copies can move them after recording")
    moved = []
    for host in runtime._host:
        for name, tensor in host.items():
            raw = allocate(tensor.nbytes)
            new = raw.view(tensor.dtype).view(tensor.shape)
            new.copy_(tensor)
            host[name] = new
            moved.append(new)
    return moved


def restore_slots(runtime) -> None:
    """Copy back into each of an `OffloadRuntime`'s slot buffers the layer it is meant to hold
    (after `contended_copy_ms` wrote other layers into them)."""
    counters = runtime._counters
    owner = runtime._slot_owner
    for (slot, name), entity in runtime._entity.items():
        position = counters.pending[entity] if counters is not None else owner.get((slot, name))
        if position is not None:
            runtime._slots[position][name].copy_(runtime._host[position][name])
    torch.cuda.synchronize(runtime.device)


def host_tensors(runtime) -> list[torch.Tensor]:
    """An `OffloadRuntime`'s host copies, layer by layer: what its prefetches copy from."""
    return [t for host in runtime._host for t in host.values()]


def load_test(runtime, device: torch.device) -> dict[str, dict[str, float]]:
    """`contended_copy_ms` of an `OffloadRuntime`'s host copies into a scratch buffer and into
    its own slot buffers (whose contents are put back after)."""
    hosts = host_tensors(runtime)
    scratch = torch.empty(max(t.nbytes for t in hosts), dtype=torch.uint8, device=device)
    into_scratch = [(scratch[: t.nbytes].view(t.dtype).view(t.shape), t) for t in hosts]
    into_slots = [
        (slots[name], host[name])
        for host, slots in zip(runtime._host, runtime._slots, strict=True)
        for name in host
    ]
    weights = _weights(device, 2 << 30)
    result = {
        "into_scratch": contended_copy_ms(into_scratch, weights),
        "into_slots": contended_copy_ms(into_slots, weights),
    }
    restore_slots(runtime)
    return result


def rehome_as_flagged(runtime, flags: set[str]) -> list[torch.Tensor] | None:
    """`rehome_host_copies` as a benchmark mode's flags say (``+hugepages``: `huge_pinned`,
    ``+repinned``: `torch_pinned`); None where they say neither."""
    if "hugepages" in flags:
        return rehome_host_copies(runtime, huge_pinned)
    if "repinned" in flags:
        return rehome_host_copies(runtime, torch_pinned)
    return None


def _weights(device: torch.device, total_bytes: int) -> list[torch.Tensor]:
    """About ``total_bytes`` of Llama-3-8B MLP-shaped weights to stream as load."""
    shape = (14336, 4096)  # a Llama-3-8B MLP weight
    count = max(1, total_bytes // (shape[0] * shape[1] * 2))
    return [torch.randn(shape, dtype=torch.bfloat16, device=device) for _ in range(count)]


def contended_copy_ms(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    weights: Sequence[torch.Tensor],
    tokens: int = 16,
    repeats: int = 3,
) -> dict[str, float]:
    """ms to run the copies ``dst.copy_(src)`` back to back on one stream, alone and while
    ``tokens``-row matmuls stream ``weights`` (`_weights`) on another stream without pause."""
    device = weights[0].device
    x = torch.randn(tokens, 4096, dtype=torch.bfloat16, device=device)
    copy_stream, load_stream = torch.cuda.Stream(device), torch.cuda.Stream(device)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def copies() -> float:
        with torch.cuda.stream(copy_stream):
            begin.record()
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            end.record()
        end.synchronize()
        return begin.elapsed_time(end)

    torch.cuda.synchronize(device)
    copies()
    alone = sorted(copies() for _ in range(repeats))[repeats // 2]
    loaded = []
    for _ in range(repeats):
        with torch.cuda.stream(load_stream):  # more load than the copies take to finish
            for _ in range(int(alone / 0.2) + 20):
                for w in weights[:8]:
                    torch.mm(x, w.t())
        loaded.append(copies())
        torch.cuda.synchronize(device)
    return {"alone_ms": alone, "loaded_ms": sorted(loaded)[repeats // 2]}
