"""Parameter groups and the per-iteration learning-rate schedule."""

from __future__ import annotations

import math

from torch import nn


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases and 1-d tensors (norms, layer scales, q/v biases) take no weight decay; every other tensor,
    class and mask tokens included, does, as in the MAE, CAE and ConvMAE authors' pretraining scripts.
    (The fixed sin-cos position tables have no gradient and are not optimised at all.)"""
    return param.ndim <= 1 or name.endswith(".bias")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, skip = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (skip if no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": skip, "weight_decay": 0.0}]


def cosine_lr(step: int, total_steps: int, peak_lr: float, warmup_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup to `peak_lr`, then half-cycle cosine to `min_lr`, evaluated per optimizer step."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
