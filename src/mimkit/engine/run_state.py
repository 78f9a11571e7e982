"""A training run's state in and out of a checkpoint: what `Trainer.state_dict` holds and how `Trainer` resumes.

The layout (engine/checkpoint.py's format plus the trainer's entries): model weights and config, the
optimizer state (integer ids, single-process layout, under FSDP too), the online probe, step, micro-batches
done (hence epoch and position in it), the RNG state, the resolved config and the process count.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (
    check_resume,
    load_checkpoint,
    load_model_weights,
    load_optimizer_state,
    model_state,
    model_weights,
    optimizer_state,
)

__all__ = ["resume_training", "training_state"]


def training_state(trainer: Any) -> dict[str, Any]:
    """The full training state of a `Trainer`; under FSDP a collective every rank calls (rank 0 gets it)."""
    t = trainer
    return {
        **model_state(t.model, model_weights(t.model)),
        "optimizer": optimizer_state(t.trained, t.optimizer),
        "online_probe": model_weights(t.online_probe) if t.online_probe else None,
        "step": t.step,
        "micro_done": t.micro_done,
        "epoch": t.micro_done // t.micro_per_epoch,
        "batch_in_epoch": t.micro_done % t.micro_per_epoch,
        "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])},
        "config": t.cfg.to_dict(),
        "world_size": t.dist.world_size,
    }


def resume_training(trainer: Any, where: str) -> str | None:
    """Load the checkpoint at `where` ("auto": the run folder's checkpoint.pt, if any) into a `Trainer`:
    weights, optimizer, probe, position and RNG. ConfigError when the run differs in what decides batches,
    masks or the model (unless train.resume_force). Returns what to report, None when nothing was resumed."""
    t = trainer
    path = t.out_dir / "checkpoint.pt" if where == "auto" else Path(where)
    if where == "auto" and not path.exists():
        return None
    ckpt = load_checkpoint(path)
    model_config = dataclasses.asdict(t.method.config)
    differences = check_resume(ckpt, path, t.cfg.to_dict(), t.dist.world_size, model_config)
    load_model_weights(t.model, ckpt["model"])
    if t.online_probe is not None and ckpt.get("online_probe"):
        t.online_probe.load_state_dict(ckpt["online_probe"])
    load_optimizer_state(t.trained, t.optimizer, ckpt["optimizer"])
    t.step, t.micro_done = int(ckpt["step"]), int(ckpt["micro_done"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if path.resolve() == (t.out_dir / "checkpoint.pt").resolve():
        t.last_saved_step = t.step
    forced = f"; despite different {', '.join(differences)} (train.resume_force)" if differences else ""
    return f"resumed from {path} at step {t.step}{forced}"
