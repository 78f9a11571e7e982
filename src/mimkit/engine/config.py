"""Training configuration: defaults here, an experiment YAML with what differs, then command-line overrides.

    cfg = load_config("configs/mae_tiny_fmnist.yaml", ["optim.base_lr=3e-4", "train.epochs=2"])

The resolved config is written next to the results (`config.yaml` in the run directory) and stored in
every checkpoint.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    """YAML 1.2 floats: `1e-4` is a number (PyYAML's YAML 1.1 rules would read it as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*\.?\d*(?:[eE][-+]?\d+)|\d[\d_]*\.\d*|\.\d+|\.inf|\.nan)$", re.X),
    list("-+0123456789."),
)


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


@dataclass
class DataConfig:
    source: str = "fashion_mnist"  # folder | fashion_mnist | synthetic | cifar10 | shards
    path: str | None = None  # folder root, dataset directory, or shard pattern
    split: str = "train"
    num_samples: int | None = None  # synthetic size, or a cap on any source
    batch_size: int = 64  # per process, per micro-batch
    num_workers: int = 2
    mean: list[float] | None = None  # None = the source's usual statistics
    std: list[float] | None = None
    min_crop_scale: float = 0.2  # RandomResizedCrop scale lower bound (MAE)


@dataclass
class OptimConfig:
    base_lr: float = 1.5e-4  # lr = base_lr * effective_batch / 256
    lr: float | None = None  # absolute lr; overrides base_lr when set
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = 40.0
    warmup_steps: int | None = None  # overrides warmup_epochs when set
    accum_steps: int = 1  # gradient accumulation: micro-batches per optimizer step
    clip_grad: float | None = None  # max global grad norm, None = no clipping


@dataclass
class TrainConfig:
    epochs: float = 800.0
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    precision: str = "bf16"  # bf16 (autocast) | fp32
    seed: int = 0
    output_dir: str = "runs/mae"
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 20  # optimizer steps between metric lines
    ckpt_every: int = 500  # optimizer steps between checkpoints (and one at the end)
    keep_every_epochs: int | None = None  # also keep checkpoint-epochNNNN.pt every N epochs
    resume: str | None = None  # path to a checkpoint, or "auto" = output_dir/checkpoint.pt if present
    compile: bool = False  # torch.compile the model
    online_probe: bool = False  # train a linear head on detached features (needs labels)
    distributed: str = "ddp"  # ddp | fsdp (FSDP2; used only when launched with several processes)
    activation_checkpointing: bool = False  # recompute block activations in backward (fsdp only)
    progress: bool = True
    matmul_ceiling: float | None = None  # FLOP/s for MFU; None = measured at start-up (about a second)


@dataclass
class Config:
    model: dict[str, Any] = field(default_factory=lambda: {"name": "mae_vit_tiny_patch4_32"})
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["optim"]["betas"] = list(d["optim"]["betas"])
        return d

    @property
    def model_name(self) -> str:
        return self.model["name"]

    @property
    def model_overrides(self) -> dict[str, Any]:
        return {k: v for k, v in self.model.items() if k != "name"}


def _build(cls, values: dict[str, Any], where: str):
    if not isinstance(values, dict):
        raise ValueError(f"config section '{where}' must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown key(s) {unknown} in config section '{where}'; valid keys: {sorted(fields)}"
        )
    return cls(**{k: tuple(v) if k == "betas" else v for k, v in values.items()})


def config_from_dict(d: dict[str, Any]) -> Config:
    unknown = sorted(set(d) - {"model", "data", "optim", "train"})
    if unknown:
        raise ValueError(f"unknown config section(s) {unknown}; valid sections: model, data, optim, train")
    model = dict(d.get("model") or {"name": "mae_vit_tiny_patch4_32"})
    if "name" not in model:
        raise ValueError("config section 'model' needs a 'name' (see `mimkit.list_models()`)")
    return Config(
        model=model,
        data=_build(DataConfig, d.get("data") or {}, "data"),
        optim=_build(OptimConfig, d.get("optim") or {}, "optim"),
        train=_build(TrainConfig, d.get("train") or {}, "train"),
    )


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (values parsed as YAML) to a nested config dict."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(
                f"override {item!r} is not of the form section.key=value (e.g. optim.base_lr=3e-4)"
            )
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2:
            raise ValueError(f"override key {key!r} must be section.key, e.g. train.epochs=10")
        section, name = parts
        d.setdefault(section, {})
        if d[section] is None:
            d[section] = {}
        d[section][name] = parse_yaml(raw)
    return d


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    d: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found (presets live in configs/)")
        d = parse_yaml(path.read_text()) or {}
    cfg = config_from_dict(apply_overrides(d, overrides or []))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    if cfg.train.precision not in ("bf16", "fp32"):
        raise ValueError(f"train.precision must be 'bf16' or 'fp32', got {cfg.train.precision!r}")
    if cfg.train.distributed not in ("ddp", "fsdp"):
        raise ValueError(f"train.distributed must be 'ddp' or 'fsdp', got {cfg.train.distributed!r}")
    if cfg.train.online_probe and cfg.train.distributed == "fsdp":
        raise ValueError(
            "train.online_probe is not supported with train.distributed=fsdp; use ddp or turn it off"
        )
    if cfg.data.batch_size < 1 or cfg.optim.accum_steps < 1:
        raise ValueError("data.batch_size and optim.accum_steps must be >= 1")
    from ..registry import model_config

    model_config(cfg.model_name, **cfg.model_overrides)  # raises a clear error on a bad name / option


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
