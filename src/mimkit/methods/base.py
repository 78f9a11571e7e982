"""What every method returns, so the trainer, visualizer and probes treat MAE, CAE and ConvMAE alike."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class MIMOutput:
    """loss: scalar to minimise; pred: [B, L, K] predictions for every patch (K = p*p*C for pixels, or the
    codebook size for token targets); mask: [B, L] bool, True = masked; metrics: detached scalars to log."""

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    features: torch.Tensor | None = None
