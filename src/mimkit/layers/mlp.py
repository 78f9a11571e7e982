from __future__ import annotations

import torch
from torch import nn


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (timm names)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # [..., dim]


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (CaiT); timm names its parameter `gamma`."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma
