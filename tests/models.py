"""Small models shared by the tests (the Llama-shaped one lives in offload_compiler.llama)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from offload_compiler.llama import LlamaShaped

__all__ = ["BiasBlock", "GatedBlock", "LlamaShaped", "MLPStack", "TwoStacks", "clone_model"]


class BiasBlock(nn.Module):
    """relu(W x + b) + x: a bias + relu + residual kernel that reads the slot's bias."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x)) + x


class MLPStack(nn.Module):
    def __init__(self, layers: int = 6, dim: int = 16, graph_break_after: int | None = None):
        super().__init__()
        self.proj_in = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(BiasBlock(dim) for _ in range(layers))
        self.graph_break_after = graph_break_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)
        split = len(self.blocks) if self.graph_break_after is None else self.graph_break_after + 1
        for block in self.blocks[:split]:
            x = block(x)
        if split < len(self.blocks):
            torch._dynamo.graph_break()  # Dynamo resumes in a second graph
            for block in self.blocks[split:]:
                x = block(x)
        return x


class PerLayerBreaks(MLPStack):
    """A graph break inside the loop: Dynamo compiles each block's forward on its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)
        for block in self.blocks:
            x = block(x)
            torch._dynamo.graph_break()
        return x


class GatedBlock(nn.Module):
    """x + sigmoid(G x) * (W x): a block of another class and other parameters than BiasBlock."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.sigmoid(self.gate(x)) * self.value(x)


class TwoStacks(nn.Module):
    """An encoder stack and a decoder stack of different blocks, as in T5 or Flux; with
    ``graph_break`` the decoder runs in a graph of its own."""

    def __init__(
        self, encoder: int = 3, decoder: int = 3, dim: int = 8, graph_break: bool = False
    ) -> None:
        super().__init__()
        self.encoder = nn.ModuleList(BiasBlock(dim) for _ in range(encoder))
        self.decoder = nn.ModuleList(GatedBlock(dim) for _ in range(decoder))
        self.graph_break = graph_break

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.encoder:
            x = block(x)
        if self.graph_break:
            torch._dynamo.graph_break()
        for block in self.decoder:
            x = block(x)
        return x


def clone_model(model: nn.Module) -> nn.Module:
    """An independent model with the same weights, for an un-offloaded reference."""
    return copy.deepcopy(model)
