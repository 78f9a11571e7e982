"""A training run's state in and out of a checkpoint: what `Trainer.state_dict` holds and how `Trainer` resumes.

The layout (engine/checkpoint.py's format plus the trainer's entries): model weights and config, the
optimizer state (integer ids, single-process layout, under FSDP too), the online probe, step, micro-batches
done (hence epoch and position in it), the RNG state, the resolved config and the process count.
"""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path
from typing import Any

import torch

from ..errors import LIKELY_CAUSES, NonFiniteLossError
from .checkpoint import (
    check_resume,
    load_checkpoint,
    load_model_weights,
    load_optimizer_state,
    model_state,
    model_weights,
    optimizer_state,
    write_checkpoint,
)
from .distributed import all_finite, barrier

__all__ = ["check_finite_loss", "resume_training", "save_training", "training_state"]


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


def save_training(trainer: Any, name: str = "checkpoint.pt", export: bool = False) -> Path:
    """`Trainer.save`: refuse non-finite weights (every rank checks), gather the state (every rank takes
    part under FSDP), write it on rank 0 and, with `export`, the encoder as `mimkit export --format
    safetensors --encoder-only` writes it."""
    t = trainer
    path = t.out_dir / name
    if not all_finite(t.model.parameters(), t.dist):
        raise NonFiniteLossError(
            f"the weights hold NaN or infinite values at step {t.step}; {path.name} was not written "
            f"({kept_checkpoint(t)}); {LIKELY_CAUSES}"
        )
    state = training_state(t)
    if t.dist.is_main:
        encoder = t.out_dir / "encoder.safetensors" if export else None
        write_checkpoint(state, path, encoder, t.method.method)
    if name == "checkpoint.pt":
        t.last_saved_step = t.step
    barrier(t.dist)
    return path


def check_finite_loss(trainer: Any, stats: Any) -> None:
    """NonFiniteLossError when the step just taken (`stats`: its metrics) had a NaN or infinite loss."""
    if not math.isfinite(stats["loss"]):
        raise NonFiniteLossError(
            f"loss is {stats['loss']} at step {trainer.step - 1} (lr {stats['lr']:.3g}); stopped without writing "
            f"a checkpoint ({kept_checkpoint(trainer)}); {LIKELY_CAUSES}"
        )


def kept_checkpoint(trainer: Any) -> str:
    """Which checkpoint a failure leaves in place, for its message."""
    if trainer.last_saved_step is None:
        return "no checkpoint was written yet"
    return f"{trainer.out_dir / 'checkpoint.pt'} from step {trainer.last_saved_step} is the last finite one"
