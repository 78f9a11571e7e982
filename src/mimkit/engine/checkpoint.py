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

from ..data.transforms import preprocessing
from ..errors import ConfigError, OutputError
from ..protocols import as_method

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


def write_checkpoint(
    state: dict[str, Any], path: Path, encoder: Path | None = None, method: str | None = None
) -> None:
    """`atomic_save` a training state and, given `encoder`, its encoder as safetensors (`save_encoder`);
    OutputError when the disk refuses (the previous file at `path` stays)."""
    try:
        atomic_save(state, path)
        if encoder is not None:
            save_encoder(state, encoder, method)
    except OSError as err:
        kept = f"the previous {path.name} is kept" if path.exists() else "nothing was written"
        raise OutputError(
            f"could not write {path}: {err.strerror or err}; {kept}. Free some disk space or choose "
            "another train.output_dir, then resume with train.resume=auto"
        ) from None


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


# The training state in a single-process layout, for plain and FSDP-sharded modules alike, through
# torch.distributed.checkpoint.state_dict: full tensors, on CPU, gathered on rank 0 (other ranks get empty
# dicts); under FSDP every rank must take part. The optimizer state keeps `optimizer.state_dict()`'s integer
# ids (in param-group order), so a checkpoint moves between plain, DDP and FSDP runs.


def _full(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def optimizer_state(modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` layout of an optimizer over the parameters of `modules`, gathered."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if not optimizer.state:  # before the first step (get_optimizer_state_dict would step it to create state)
        return optimizer.state_dict()
    named: Any = get_optimizer_state_dict(nn.ModuleDict(modules), optimizer, options=_full(cpu_offload=True))
    if not named:  # a rank other than 0
        return {}
    ids = {name: i for i, name in enumerate(n for group in named["param_groups"] for n in group["params"])}
    return {
        "state": {ids[name]: entry for name, entry in named["state"].items()},
        "param_groups": [{**g, "params": [ids[n] for n in g["params"]]} for g in named["param_groups"]],
    }


def load_optimizer_state(
    modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load an `optimizer_state` (or any `optimizer.state_dict()` built the same way) on every rank."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    holder = nn.ModuleDict(modules)
    name_of = {id(p): name for name, p in holder.named_parameters()}
    names = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    named: Any = {
        "state": {names[int(i)]: _cloned(entry) for i, entry in state["state"].items()},
        "param_groups": [
            {**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]
        ],
    }
    set_optimizer_state_dict(holder, optimizer, named, options=_full())


def model_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full `model.state_dict()` on CPU (gathered on rank 0 under FSDP; other ranks get {})."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return dict(get_model_state_dict(model, options=_full(cpu_offload=True)))  # type: ignore[arg-type]


def load_model_weights(model: nn.Module, weights: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load a full state dict into a plain or sharded model; every rank passes it."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, dict(weights), options=_full(strict=strict))


def _cloned(entry: dict[str, Any]) -> dict[str, Any]:
    """Never share a tensor (e.g. AdamW's `step`, updated in place) with the optimizer the state came from."""
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in entry.items()}


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


def check_resume(
    ckpt: dict[str, Any], path: Path, config: dict[str, Any], world_size: int, model_config: dict[str, Any]
) -> list[str]:
    """ConfigError unless the run `config` (the resolved config as a dict) may resume from `ckpt` (read from
    `path`): the same model preset, and the same batches and masks unless `train.resume_force`; returns the
    differences that `resume_force` lets pass."""
    wanted = config["model"]["name"]
    if ckpt.get("model_name") != wanted:
        raise ConfigError(
            f"cannot resume: {path} holds {ckpt.get('model_name')!r}, the config asks for {wanted!r}"
        )
    differences = resume_differences(ckpt, config, world_size, model_config)
    if differences and not config["train"]["resume_force"]:
        raise ConfigError(
            f"cannot resume from {path}: the config differs from the checkpoint's in {', '.join(differences)}; "
            "the batches and masks would not be those of an uninterrupted run. Use the checkpoint's values, "
            "or add --force-resume (train.resume_force=true) to continue anyway"
        )
    return differences


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
        "model_config": dataclasses.asdict(as_method(model).config),
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
        inner = model._modules.get("module") or model._modules.get("_orig_mod")
        if inner is None:
            return model
        model = inner


def save_encoder(checkpoint: dict[str, Any], out: str | os.PathLike, method: str | None = None) -> Path:
    """A training checkpoint's encoder as `<out>.safetensors` (timm key names), without building the model.
    (Here, not in interop/, because the trainer writes it; `interop.export` re-exports it as export_encoder.)

    The trainer's `encoder.safetensors`: the same tensors and metadata as
    `export_safetensors(checkpoint, out, encoder_only=True)` (no JSON beside it), so `mimkit.load` and
    every command read it the same way. `method` is the model's `method` ("mae", ...), as that export records.
    """
    prefix = "encoder."
    sd = {k[len(prefix) :]: v.detach().contiguous().cpu() for k, v in checkpoint["model"].items()
          if k.startswith(prefix)}  # fmt: skip
    config = checkpoint["model_config"]
    data = (checkpoint.get("config") or {}).get("data") or None
    meta = {
        "format": "mimkit/1",
        "model_name": checkpoint["model_name"],
        "method": method,
        "model_config": config,
        "contents": "encoder",
        "preprocessing": preprocessing(config, data),
    }
    return save_safetensors(sd, meta, out, sidecar=False)


def save_safetensors(
    sd: dict[str, torch.Tensor], meta: dict[str, Any], out: str | os.PathLike, sidecar: bool = True
) -> Path:
    """`<out>.safetensors` with `meta` in its metadata (written whole, then renamed) and, with `sidecar`,
    the same JSON in `<out>.json`."""
    from safetensors.torch import save_file

    meta = json.loads(json.dumps(meta, default=list))  # tuples -> lists, as the JSON file will read back
    path = Path(out).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # never half a file under the real name
    try:
        save_file(sd, str(tmp), metadata={"format": "pt", "mimkit": json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if sidecar:
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return path
