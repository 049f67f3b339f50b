"""The device side of the counter protocol (`counter_order`): two int32 counters per entity in
device memory, the driver's stream memory operations on them, and the captured wait and release
kernels (Triton).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from typing import Any

import torch

WAIT_LIMIT_S = 120.0
"""How long a captured wait spins before it traps (the CUDA context then reports a launch
failure): far beyond any copy queue, which drains at tens of GB/s."""


class StreamMemOps:
    """The driver's ``cuStreamWaitValue32`` (greater or equal) and ``cuStreamWriteValue32``."""

    def __init__(self) -> None:
        cuda = ctypes.CDLL("libcuda.so.1")
        args = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        self._wait = getattr(cuda, "cuStreamWaitValue32_v2", None) or cuda.cuStreamWaitValue32
        self._write = getattr(cuda, "cuStreamWriteValue32_v2", None) or cuda.cuStreamWriteValue32
        for fn in (self._wait, self._write):
            fn.argtypes, fn.restype = args, ctypes.c_int

    def wait_geq(self, stream: torch.cuda.Stream, address: int, value: int) -> None:
        """``stream`` waits until the int32 at ``address`` is >= ``value`` (modulo 2**32)."""
        self._check(self._wait(stream.cuda_stream, address, value & 0xFFFFFFFF, 0), "Wait")

    def write(self, stream: torch.cuda.Stream, address: int, value: int) -> None:
        """``stream`` writes ``value`` to the int32 at ``address``, after a memory fence."""
        self._check(self._write(stream.cuda_stream, address, value & 0xFFFFFFFF, 0), "Write")

    @staticmethod
    def _check(result: int, what: str) -> None:
        if result != 0:
            raise RuntimeError(f"cuStream{what}Value32 failed: CUresult {result}")


def _build_kernels() -> tuple[Any, Any]:
    """The captured wait and release kernels (Triton, absent from CPU-only installs)."""
    import triton
    import triton.language as tl

    # first/count unspecialised and the counters always fresh allocations: one build each,
    # made (and its module loaded) before any capture or counter wait
    @triton.jit(do_not_specialize=["first", "count", "limit_ns"])
    def spin(landed_ptr, released_ptr, first, count, limit_ns):
        begin = tl.inline_asm_elementwise(
            "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
        )
        for e in range(first, first + count):
            need = tl.atomic_add(released_ptr + e, 0, sem="relaxed") + 1
            have = tl.atomic_add(landed_ptr + e, 0, sem="acquire")
            now = begin
            while (have - need < 0) & (now - begin < limit_ns):
                have = tl.atomic_add(landed_ptr + e, 0, sem="acquire")
                now = tl.inline_asm_elementwise(
                    "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
                )
            if have - need < 0:
                tl.inline_asm_elementwise(
                    "trap; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1
                )

    @triton.jit(do_not_specialize=["first", "count"])
    def bump(released_ptr, first, count):
        for e in range(first, first + count):
            tl.atomic_add(released_ptr + e, 1, sem="release")

    return spin, bump


def _runs(entities: Sequence[int]) -> list[tuple[int, int]]:
    """``entities`` as (first, count) runs of consecutive values, in order."""
    runs: list[list[int]] = []
    for e in entities:
        if runs and runs[-1][0] + runs[-1][1] == e:
            runs[-1][1] += 1
        else:
            runs.append([e, 1])
    return [(first, count) for first, count in runs]


class CudaCounters:
    """The counters in device memory, the stream memory operations and the captured kernels;
    ``copy_tensor(entity, position)`` copies into the entity's slot on the current stream."""

    def __init__(
        self,
        size: int,
        device: torch.device,
        copy_stream: torch.cuda.Stream,
        copy_tensor: Callable[[int, int], None],
    ) -> None:
        self._device = device
        self._copy_stream = copy_stream
        self._copy_tensor = copy_tensor
        self._memops = StreamMemOps()
        self._spin, self._bump = _build_kernels()
        self._limit_ns = int(WAIT_LIMIT_S * 1e9)
        with torch.cuda.device(device):
            self.landed = torch.zeros(size, dtype=torch.int32, device=device)
            self.released = torch.zeros(size, dtype=torch.int32, device=device)
            self._unblocking = torch.cuda.Stream(device)
            # built and loaded now: a module load waits for the device, which would never
            # finish while the copy stream sits on a counter that only this kernel moves
            self._launch_spin(0, 0)
            self._launch_bump(0, 0)
            torch.cuda.synchronize(device)  # the zeros are in place before any stream waits

    def capturing(self) -> bool:
        return torch.cuda.is_current_stream_capturing()

    def release(self, entity: int, value: int) -> None:
        self._memops.write(self._current(), self._address(self.released, entity), value)

    def wait(self, entity: int, value: int) -> None:
        self._memops.wait_geq(self._current(), self._address(self.landed, entity), value)

    def copy(self, entity: int, position: int, ready: int, landed: int) -> None:
        stream = self._copy_stream
        self._memops.wait_geq(stream, self._address(self.released, entity), ready)
        with torch.cuda.stream(stream):
            self._copy_tensor(entity, position)
        self._memops.write(stream, self._address(self.landed, entity), landed)

    def spin(self, entities: Sequence[int]) -> None:
        for first, count in _runs(entities):
            self._launch_spin(first, count)

    def bump(self, entities: Sequence[int]) -> None:
        for first, count in _runs(entities):
            self._launch_bump(first, count)

    def unblock(self, entity: int, value: int) -> None:
        self._unblocking.wait_stream(self._current())
        self._memops.write(self._unblocking, self._address(self.released, entity), value)

    def _current(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self._device)

    @staticmethod
    def _address(counters: torch.Tensor, entity: int) -> int:
        return counters.data_ptr() + counters.element_size() * entity

    def _launch_spin(self, first: int, count: int) -> None:
        self._spin[(1,)](self.landed, self.released, first, count, self._limit_ns, num_warps=1)

    def _launch_bump(self, first: int, count: int) -> None:
        self._bump[(1,)](self.released, first, count, num_warps=1)


def counters_available(device: torch.device) -> str | None:
    """Why host copies cannot run on ``device`` (None when they can)."""
    if device.type != "cuda":
        return "not a CUDA device"
    if torch.version.hip is not None:
        return "ROCm"
    try:
        import triton  # noqa: F401

        ctypes.CDLL("libcuda.so.1").cuStreamWriteValue32  # noqa: B018
    except (ImportError, OSError, AttributeError) as err:
        return str(err)
    return None
