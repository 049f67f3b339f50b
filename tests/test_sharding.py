"""Tensor parallelism: each rank of a ``parallelize_module`` model offloads and streams only its
shard. Two CPU processes (gloo) compare the offloaded compiled model with the same TP model
compiled by Inductor and with the single-process model, first call included, and after an
offloaded shard changes in place."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

from offload_compiler.sharding import local
from tests.models import LlamaShaped

WORLD = 2


class TPBlock(nn.Module):
    """x + down(relu(up(x))): up split by columns, down by rows (one all-reduce)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class TPStack(nn.Module):
    def __init__(self, layers: int = 4, dim: int = 16) -> None:
        super().__init__()
        self.proj_in = nn.Linear(dim, dim)
        self.layers = nn.ModuleList(TPBlock(dim) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)
        for layer in self.layers:
            x = layer(x)
        return x


def _parallelized(model: nn.Module, mesh) -> nn.Module:
    """Megatron-style: the first matmul of each pair split by columns, the second by rows; a
    Llama layer's heads split over the ranks (each rank attends with its own heads)."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    for layer in model.layers:
        if isinstance(layer, TPBlock):
            plan = {"up": ColwiseParallel(), "down": RowwiseParallel()}
        else:
            plan = {name: ColwiseParallel() for name in ("q_proj", "k_proj", "v_proj")}
            plan |= {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel()}
            plan |= {"o_proj": RowwiseParallel(), "down_proj": RowwiseParallel()}
            layer.heads //= WORLD
            layer.kv_heads //= WORLD
        parallelize_module(layer, mesh, plan)
    return model


def _build(name: str) -> nn.Module:
    if name == "mlp":
        return TPStack()
    return LlamaShaped(layers=4, dim=32, heads=4, kv_heads=2, hidden=64, vocab=64)


def _inputs(name: str, call: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(call)
    if name == "mlp":
        return torch.randn(3, 16, generator=generator)
    return torch.randint(0, 64, (2, 8), generator=generator)


def _rank(rank: int, port: int, name: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    import offload_compiler

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        torch.manual_seed(0)
        single = _build(name).eval()
        tp_reference = torch.compile(_parallelized(copy.deepcopy(single), mesh))
        model = _parallelized(copy.deepcopy(single), mesh)
        options = {"prefetch": {"offload_group_size": 2, "offload_num_in_group": 1}}
        compiled = torch.compile(model, backend="offload", options=options)
        with torch.no_grad():
            for call in range(3):
                x = _inputs(name, call)
                got = compiled(x)
                torch.testing.assert_close(got, tp_reference(x), rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(got, single(x), rtol=1e-5, atol=1e-5)
            # an offloaded shard changed in place reaches the next call
            for each in (model, single):
                next(each.layers[1].parameters()).mul_(2)
            torch.testing.assert_close(compiled(x), single(x), rtol=1e-5, atol=1e-5)
        (stack,) = offload_compiler.offloaded_stacks(model)
        assert stack.layers == (1, 3)
        shards = [local(p) for i in (1, 3) for p in model.layers[i].parameters()]
        assert [tuple(h.shape) for h in stack.host_tensors] == [tuple(s.shape) for s in shards]
        assert stack.host_bytes == sum(s.nbytes for s in shards)
        whole = sum(p.nbytes for i in (1, 3) for p in single.layers[i].parameters())
        assert stack.host_bytes < whole  # the matrices are split (norms and biases replicated)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")
@pytest.mark.parametrize("name", ["mlp", "llama"])
def test_each_rank_offloads_its_shard_and_equals_the_tp_and_single_process_models(name):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, name), nprocs=WORLD, join=True)
