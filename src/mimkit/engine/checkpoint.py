"""One checkpoint format for every method: atomic writes, loads that never execute pickled code.

A mimkit checkpoint is a dict saved with `torch.save`:
    format        "mimkit/1"
    model_name    registered preset name, e.g. "mae_vit_tiny_patch4_32"
    model_config  the method config as a plain dict (the preset with overrides applied)
    model         the model's state dict
    and, when written by the trainer: optimizer, step, epoch, batch_in_epoch, rng, config (the resolved
    training config as a plain dict).
Everything in it is tensors and plain Python containers, so `torch.load(weights_only=True)` reads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import OutputError

FORMAT = "mimkit/1"


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that an interrupted `atomic_save` left in `folder` (`.<name>.<random>.tmp`);
    returns what was removed. A complete checkpoint is never a temporary: its rename is the last step."""
    removed = []
    for tmp in sorted(Path(folder).glob(".*.tmp")):
        if tmp.is_file():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def training_weights(
    model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model state dict, optimizer state dict) in a single-process layout. `sharded` (FSDP): gathered on
    rank 0, a collective every rank calls (the others get empty dicts)."""
    if not sharded:
        return model.state_dict(), optimizer.state_dict()
    from .fsdp import full_model_state_dict, full_optimizer_state_dict

    return full_model_state_dict(model), full_optimizer_state_dict(model, optimizer)


def load_training_weights(
    model: nn.Module, optimizer: torch.optim.Optimizer, ckpt: dict[str, Any], sharded: bool = False
) -> None:
    """Load a checkpoint's "model" and "optimizer" (single-process layout) into a plain or sharded model."""
    if not sharded:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        return
    from .fsdp import load_full_model_state_dict, load_full_optimizer_state_dict

    load_full_model_state_dict(model, ckpt["model"])
    load_full_optimizer_state_dict(model, optimizer, ckpt["optimizer"])


def prepare_output_dir(out: Path) -> list[Path]:
    """Create a run directory and prove it writable now (not after an hour of training); clean up what an
    interrupted checkpoint write left behind (returned). OutputError says what to do otherwise."""
    fix = "choose a writable folder with --output-dir (train.output_dir=...)"
    if out.exists() and not out.is_dir():
        raise OutputError(f"train.output_dir={out} is a file, not a folder; {fix}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OutputError(f"cannot write to train.output_dir={out}: {err.strerror or err}; {fix}") from None
    return remove_stale_temporaries(out)


def resume_differences(
    ckpt: dict[str, Any], config: dict[str, Any], world_size: int, model_config: dict[str, Any]
) -> list[str]:
    """'key (checkpoint A, now B)' for each setting that decides batches, masks or the model, comparing a
    training checkpoint with the run about to resume from it (`config` = the resolved config as a dict)."""
    saved = ckpt.get("config") or {}
    pairs = [
        (f"{section}.{key}", saved.get(section, {}).get(key), config[section][key])
        for section, key in (("data", "batch_size"), ("optim", "accum_steps"), ("train", "seed"))
    ]
    if "world_size" in ckpt:
        pairs.append(("processes", ckpt["world_size"], world_size))
    saved_model = ckpt.get("model_config") or {}
    for key in sorted(set(saved_model) | set(model_config)):
        if key != "tokenizer_path":  # where the tokenizer file lives is not what it is
            pairs.append((f"model.{key}", saved_model.get(key), model_config.get(key)))
    if "world_size" in ckpt:  # N processes x batch b == 1 process x N accumulated micro-batches of b
        saved_global = ckpt["world_size"] * saved.get("optim", {}).get("accum_steps", 1)
        if saved_global == world_size * config["optim"]["accum_steps"]:
            pairs = [p for p in pairs if p[0] not in ("processes", "optim.accum_steps")]
    plain = lambda v: json.dumps(v, sort_keys=True, default=str)  # noqa: E731  tuples == lists
    return [f"{k} (checkpoint {plain(a)}, now {plain(b)})" for k, a, b in pairs if plain(a) != plain(b)]


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with `weights_only=True`: tensors and plain containers only, no code runs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle.UnpicklingError and friends
        raise ValueError(
            f"{path} could not be loaded safely ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "mimkit never unpickles arbitrary objects; if this is an official MAE/CAE/ConvMAE or Hugging Face "
            "checkpoint, convert it with `mimkit import`."
        ) from e


def model_state(model: nn.Module, weights: dict | None = None) -> dict:
    """The checkpoint entries that describe and hold a model (unwrapping DDP / compile wrappers).

    weights: the state dict to store, when it was gathered elsewhere (FSDP); default model.state_dict().
    """
    model = unwrap(model)
    return {
        "format": FORMAT,
        "model_name": getattr(model, "model_name", None),
        "model_config": dataclasses.asdict(model.config),
        "model": model.state_dict() if weights is None else weights,
    }


def save_model(model: nn.Module, path: str | os.PathLike, **extra: Any) -> None:
    atomic_save({**model_state(model), **extra}, path)


def model_from_checkpoint(path_or_ckpt: str | os.PathLike | dict, strict: bool = True) -> nn.Module:
    """Rebuild the model a mimkit checkpoint was saved from and load its weights."""
    from ..registry import create_model

    ckpt = path_or_ckpt if isinstance(path_or_ckpt, dict) else load_checkpoint(path_or_ckpt)
    if ckpt.get("format") != FORMAT:
        raise ValueError(
            f"not a mimkit checkpoint (format={ckpt.get('format')!r}); convert foreign checkpoints with "
            "`mimkit import`"
        )
    model = create_model(ckpt["model_name"], **ckpt["model_config"])
    model.load_state_dict(ckpt["model"], strict=strict)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
