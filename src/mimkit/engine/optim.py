"""Parameter groups and the per-iteration learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import nn


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases and 1-d tensors (norms, layer scales, q/v biases) take no weight decay; every other tensor,
    class and mask tokens included, does, as in the MAE, CAE and ConvMAE authors' pretraining scripts.
    (The fixed sin-cos position tables have no gradient and are not optimised at all.)"""
    return param.ndim <= 1 or name.endswith(".bias")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay: list[nn.Parameter] = []
    skip: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (skip if no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": skip, "weight_decay": 0.0}]


def build_adamw(modules: dict[str, nn.Module], cfg: Any, lr: float, fused: bool) -> torch.optim.AdamW:
    """AdamW over `modules` in order, param groups by `param_groups`: the "model" with optim.weight_decay,
    the others (the online probe) without. `fused`: one kernel for all parameters (about 5x faster on CPU)."""
    groups = [
        g
        for name, m in modules.items()
        for g in param_groups(m, cfg.weight_decay if name == "model" else 0.0)
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), fused=fused)


def cosine_lr(step: int, total_steps: int, peak_lr: float, warmup_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup to `peak_lr`, then half-cycle cosine to `min_lr`, evaluated per optimizer step."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class RunPlan(NamedTuple):
    """How long a run is and how fast it learns, from the config and the data (`plan_run`)."""

    steps_per_epoch: float  # optimizer steps per epoch of this process's micro-batches
    total_steps: int
    warmup_steps: int
    global_batch: int  # images per optimizer step, all processes and accumulated micro-batches together
    peak_lr: float  # optim.lr, or optim.base_lr * global_batch / 256


def plan_run(cfg: Any, micro_per_epoch: int, world_size: int) -> RunPlan:
    """The run's plan from a `Config` and the micro-batches one process gets per epoch; ValueError when
    an epoch is shorter than one optimizer step."""
    optim, train = cfg.optim, cfg.train
    if micro_per_epoch < optim.accum_steps:
        raise ValueError(
            f"the dataset gives {micro_per_epoch} batches per process per epoch, fewer than "
            f"optim.accum_steps={optim.accum_steps}; use a smaller data.batch_size or more data"
        )
    steps_per_epoch = micro_per_epoch / optim.accum_steps
    total = train.max_steps or max(1, int(train.epochs * steps_per_epoch))
    warmup = (
        optim.warmup_steps if optim.warmup_steps is not None else int(optim.warmup_epochs * steps_per_epoch)
    )
    global_batch = cfg.data.batch_size * optim.accum_steps * world_size
    peak_lr = optim.lr if optim.lr is not None else optim.base_lr * global_batch / 256
    return RunPlan(steps_per_epoch, total, warmup, global_batch, peak_lr)
