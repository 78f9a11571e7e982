"""`mimkit.load(path)`: every file mimkit writes, back as a ready-to-use module, through one entry point.

    model = mimkit.load("runs/photos/checkpoint.pt")          # pretrain / import: the MAE / CAE / ConvMAE model
    encoder = mimkit.load("runs/photos/encoder.safetensors")  # the encoder alone (timm ViT names)
    model = mimkit.load("export/photos-hf")                   # `mimkit export --format hf` (or any ViTMAE dir)
    encoder = mimkit.load("export/photos_timm.safetensors")   # `mimkit export --format timm` (MAE, CAE)
    model = mimkit.load("export/photos.safetensors")          # `mimkit export --format safetensors`
    clf = mimkit.load("runs/photos/finetune/classifier.pt")   # `mimkit finetune`: images -> logits

What comes back: a method model (`.encoder`, `.forward(images)` -> loss, predictions, mask) for files that
hold the whole model; the encoder (`.forward_features(images)` -> [B, prefix + L, D]) for encoder files;
a `FinetuneClassifier` (`clf(images)` -> [B, classes], `clf.class_names`) for fine-tuned classifiers.
Every returned module is in eval mode and carries `.mimkit_info`: the preset name, its config, what the file
held, and `preprocessing` (input size, mean, std, interpolation, crop_pct; what the model was trained with).
`mimkit.load(..., eval_transform=True)` also returns the matching image transform (PIL image -> tensor).

Nothing is unpickled: `.pt` files are read with `torch.load(weights_only=True)`, `.safetensors` hold tensors.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.transforms import default_crop_pct, preprocessing

__all__ = ["CLASSIFIER_FORMAT", "Weights", "default_crop_pct", "load", "preprocessing", "read_weights"]

CLASSIFIER_FORMAT = "mimkit-classifier/1"


@dataclass
class Weights:
    """A mimkit file, read: what it holds (`kind`), the preset and config to build, the tensors, and extras."""

    kind: str  # "model" | "encoder" | "classifier"
    model_name: str
    model_config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)  # training config, class names, preprocessing


_NAMED_FIELDS = ("depth", "embed_dim", "num_heads", "depths", "embed_dims")


def display_name(model_name: str, model_config: dict[str, Any]) -> str:
    """The preset's name rewritten for what was actually built: `mae_vit_tiny_patch4_32` trained at 64 px
    with patch 8 and 6 blocks is `mae_vit_tiny_patch8_64_depth6`; a changed channel count adds `_1ch`/`_3ch`.
    Used for titles and exports; the checkpoint keeps the preset name (what `create_model` needs)."""
    import dataclasses
    import re

    from ..registry import model_config as preset_config

    try:
        preset = dataclasses.asdict(preset_config(model_name))
    except ValueError:
        return model_name
    built = dataclasses.asdict(preset_config(model_name, **model_config))

    def same(key: str) -> bool:
        a, b = built.get(key), preset.get(key)
        return json.dumps(a, default=list) == json.dumps(b, default=list)

    name = model_name
    match = re.match(r"^(.*)_patch(\d+)_(\d+)$", model_name)
    if match and not all(same(k) for k in ("img_size", "patch_size", "strides")):
        cfg = preset_config(model_name, **model_config)
        img = cfg.img_size if isinstance(cfg.img_size, int) else "x".join(str(v) for v in cfg.img_size)
        if not isinstance(cfg.img_size, int) and len(set(cfg.img_size)) == 1:
            img = cfg.img_size[0]
        patch = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
        name = f"{match.group(1)}_patch{patch}_{img}"
    for key in _NAMED_FIELDS:
        if key in built and not same(key):
            value = built[key]
            name += f"_{key}" + (
                "-".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
            )
    if not same("in_chans"):
        name += f"_{built['in_chans']}ch"
    return name


def _run_config(path: Path) -> dict[str, Any]:
    """The training config written beside a file (`config.yaml` in a run directory), or {}."""
    candidate = path.parent / "config.yaml"
    if not candidate.is_file():
        return {}
    from ..engine.config import parse_yaml

    try:
        loaded = parse_yaml(candidate.read_text())
    except Exception:  # an unrelated config.yaml: ignore it
        return {}
    return loaded if isinstance(loaded, dict) and "model" in loaded else {}


def _not_mimkit(path: Path, what: str) -> ValueError:
    return ValueError(
        f"{path} is not a file mimkit wrote ({what}). Files from the MAE / CAE / ConvMAE authors or from "
        f"Hugging Face convert with `mimkit import --from mae|cae|convmae|hf {path} --out model.pt`, "
        "then `mimkit.load('model.pt')`"
    )


def _read_safetensors(path: Path) -> Weights:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    state = load_file(str(path))
    run_cfg = _run_config(path)
    if "mimkit" in metadata:  # mimkit export --format safetensors / timm
        meta = json.loads(metadata["mimkit"])
        contents = meta.get("contents", "model")
        if contents == "timm-beit":  # CAE under timm's BEiT names: layer scales back to mimkit's
            state = {
                k.replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma"): v
                for k, v in state.items()
            }
        kind = {"timm-vit": "encoder", "timm-beit": "encoder"}.get(contents, contents)
        extra = {k: v for k, v in meta.items() if k not in ("model_name", "model_config", "contents")}
        return Weights(kind, meta["model_name"], meta["model_config"], state, {"config": run_cfg, **extra})
    if "model_name" in metadata and "model_config" in metadata:  # the trainer's encoder.safetensors
        config = json.loads(metadata["model_config"])
        return Weights("encoder", metadata["model_name"], config, state, {"config": run_cfg})
    raise _not_mimkit(path, "its safetensors metadata has no mimkit model description")


def _read_hf_directory(path: Path) -> Weights:
    from .hf import hf_to_mae_state_dict
    from .importers import import_checkpoint, load_hf_directory

    described = path / "mimkit.json"
    if described.is_file():  # exported by mimkit: the exact preset and config
        meta = json.loads(described.read_text())
        hf_sd, _ = load_hf_directory(path)
        state = hf_to_mae_state_dict(hf_sd)
        if meta.get("contents") == "encoder":  # exported from an encoder file: no trained decoder inside
            state = {k.removeprefix("encoder."): v for k, v in state.items()}
            return Weights("encoder", meta["model_name"], meta["model_config"], state, meta)
        return Weights("model", meta["model_name"], meta["model_config"], state, meta)
    ckpt = import_checkpoint(path, source="hf")  # any ViTMAE directory: config read from config.json
    return Weights("model", ckpt["model_name"], ckpt["model_config"], ckpt["model"], {})


def read_weights(path: str | os.PathLike) -> Weights:
    """Read any file (or directory) mimkit writes without building a model."""
    from ..engine.checkpoint import FORMAT, load_checkpoint

    path = Path(path).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return _read_hf_directory(path)
        if (path / "checkpoint.pt").is_file():
            return read_weights(path / "checkpoint.pt")
        raise FileNotFoundError(
            f"{path} is a directory without config.json (a Hugging Face export) or checkpoint.pt (a run); "
            "pass the file itself"
        )
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise _not_mimkit(path, "it does not hold a dict")
    fmt = ckpt.get("format")
    if fmt == FORMAT:
        meta = {k: v for k, v in ckpt.items() if k in ("config", "imported_from", "step", "epoch")}
        return Weights("model", ckpt["model_name"], ckpt["model_config"], ckpt["model"], meta)
    if fmt == CLASSIFIER_FORMAT:
        if "model_name" not in ckpt:
            raise ValueError(
                f"{path} was written by an older mimkit that did not record the architecture; run "
                "`mimkit finetune` again to get a classifier.pt that loads"
            )
        meta = {k: v for k, v in ckpt.items() if k not in ("format", "model_name", "model_config", "model")}
        return Weights("classifier", ckpt["model_name"], ckpt["model_config"], ckpt["model"], meta)
    raise _not_mimkit(path, f"format {fmt!r}")


def build_method_model(weights: Weights, **overrides: Any) -> nn.Module:
    """The method model (MAE / CAE / ConvMAE) of `weights`, with every weight the file holds.

    Encoder files and classifiers give their encoder weights (strictly: every encoder tensor, nothing
    else); the decoder then keeps its random init (`model.mimkit_info["decoder"] == "random"`), which
    probes and fine-tuning never use. `overrides` change config fields (e.g. drop_path_rate).
    """
    from ..registry import create_model

    model: Any = create_model(weights.model_name, **{**weights.model_config, **overrides})  # + .mimkit_info
    if weights.kind == "model":
        model.load_state_dict(weights.state_dict, strict=True)
    else:
        prefix = "encoder." if weights.kind == "classifier" else ""
        encoder_sd = {k[len(prefix) :]: v for k, v in weights.state_dict.items() if k.startswith(prefix)}
        model.encoder.load_state_dict(encoder_sd, strict=True)
    model.mimkit_info = info(weights)
    if weights.kind != "model":
        model.mimkit_info["decoder"] = "random"
    return model.eval()


def info(weights: Weights) -> dict[str, Any]:
    data = weights.meta.get("preprocessing") or preprocessing(
        weights.model_config, (weights.meta.get("config") or {}).get("data")
    )
    return {
        "model_name": weights.model_name,
        "name": display_name(weights.model_name, weights.model_config),
        "model_config": weights.model_config,
        "contents": weights.kind,
        "preprocessing": data,
    }


def eval_transform_for(module: Any) -> Any:
    """The deterministic eval transform (PIL image -> normalised tensor) a `mimkit.load`ed module expects."""
    from ..data import eval_transform

    p = module.mimkit_info["preprocessing"]
    c, h, w = p["input_size"]
    return eval_transform((h, w), c, p["mean"], p["std"], crop_pct=p["crop_pct"])


def load(path: str | os.PathLike, eval_transform: bool = False) -> nn.Module | tuple[nn.Module, Any]:
    """Load anything mimkit writes (see the module doc); with eval_transform, also its image transform."""
    weights = read_weights(path)
    if weights.kind == "classifier":
        from ..eval.finetune import FinetuneClassifier
        from ..registry import create_model

        method = create_model(weights.model_name, **weights.model_config)
        module: Any = FinetuneClassifier(
            method, int(weights.meta["num_classes"])
        )  # + .class_names, .mimkit_info
        module.load_state_dict(weights.state_dict, strict=True)
        module.class_names = list(weights.meta.get("class_names") or [])
    elif weights.kind == "encoder":
        method = build_method_model(weights)
        module = method.encoder
    else:
        module = build_method_model(weights)
    module.mimkit_info = info(weights)
    module.eval()
    return (module, eval_transform_for(module)) if eval_transform else module
