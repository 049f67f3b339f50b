"""What the planner needs to know of this machine and of a model's forward, found out cheaply.

`machine_costs` measures the host-to-device bandwidth, GEMM throughput and device memory
bandwidth once per device and torch version, and caches them on disk (a few hundred ms of
device time, then free). `estimate_workspace` runs the model's forward on fake tensors and
returns the peak bytes of the intermediate tensors alive at once: no memory is used, and, since
nothing is fused, it errs on the high side of what Inductor's code needs.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import statistics
import time
import weakref
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .planner import Costs

log = logging.getLogger(__name__)

_CACHE = Path(os.environ.get("OFFLOAD_COMPILER_CACHE", Path.home() / ".cache/offload_compiler"))


def machine_costs(device: torch.device) -> Costs:
    """This machine's `Costs` for ``device``: from the cache, else measured and cached."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    key = f"{name}|torch {torch.__version__}"
    path = _CACHE / "costs.json"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key in cached:
        return Costs(**cached[key], source=f"measured on {name}, cached in {path}")
    figures = _measure(device)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**cached, key: figures}, indent=1))
    except OSError as error:
        log.warning("offload: could not cache the measured costs in %s: %s", path, error)
    log.info("offload: measured on %s: %s", name, figures)
    return Costs(**figures, source=f"measured on {name}")


def _measure(device: torch.device) -> dict[str, float]:
    cuda = device.type == "cuda"
    size = (256 if cuda else 32) * 2**20
    host = torch.empty(size, dtype=torch.uint8, pin_memory=cuda)
    target = torch.empty(size, dtype=torch.uint8, device=device)
    other = torch.empty(size, dtype=torch.uint8, device=device)
    n = 8192 if cuda else 512
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    stream = torch.cuda.Stream(device) if cuda else None

    def h2d() -> None:
        if stream is None:
            target.copy_(host)
            return
        with torch.cuda.stream(stream):
            target.copy_(host, non_blocking=True)

    h2d_s = _seconds(h2d, device)
    gemm_s = _seconds(lambda: a @ a, device)
    d2d_s = _seconds(lambda: other.copy_(target), device)
    return {
        "h2d_gbps": size / h2d_s / 1e9,
        "tflops": 2 * n**3 / gemm_s / 1e12,
        "hbm_gbps": 2 * size / d2d_s / 1e9,  # a copy reads and writes every byte
    }


def _seconds(fn, device: torch.device, repeats: int = 5) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensors that ops create and are still referenced, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t) for t in torch.utils._pytree.tree_leaves((args, kwargs))}
        for tensor in torch.utils._pytree.tree_leaves(out):
            fresh = isinstance(tensor, torch.Tensor) and id(tensor) not in inputs
            if fresh and tensor._base is None and not func._schema.is_mutable:
                nbytes = tensor.untyped_storage().nbytes()
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(tensor, self._free, nbytes)
        return out

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes


def estimate_workspace(model: nn.Module, tokens: int) -> int:
    """Peak bytes of a forward's intermediates for ``tokens`` token ids (batch 1), on fake
    tensors. For models called as ``model(ids)``; pass ``workspace=`` to `plan` for others."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as fake:
        ids = fake.from_tensor(torch.zeros(1, tokens, dtype=torch.long))
        counter = _LiveBytes()
        with torch.no_grad(), counter:
            try:
                out = model(ids, use_cache=False) if _takes_cache(model) else model(ids)
            except Exception as error:
                raise ValueError(
                    f"could not estimate the activation workspace of {type(model).__name__} by "
                    f"calling it with {tokens} token ids ({error}); pass workspace= in bytes"
                ) from error
            del out
    return counter.peak


def _takes_cache(model: nn.Module) -> bool:
    return "use_cache" in inspect.signature(model.forward).parameters
