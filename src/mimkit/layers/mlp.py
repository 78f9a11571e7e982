from __future__ import annotations

import torch
from torch import nn

from .recompute import gelu_linear, norm_linear


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (timm names). With grad enabled, GELU's output is recomputed in backward rather
    than stored (`recompute.gelu_linear`); `norm` (the block's pre-norm) is applied first, likewise."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor, norm: nn.LayerNorm | None = None) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.fc2(self.act(self.fc1(x if norm is None else norm(x))))
        h = self.fc1(x) if norm is None else norm_linear(x, norm, self.fc1.weight, self.fc1.bias)
        return gelu_linear(h, self.fc2)  # [..., dim]


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (CaiT); timm names its parameter `gamma`."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma
