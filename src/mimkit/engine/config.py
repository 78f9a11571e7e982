"""Training configuration: defaults here, an experiment YAML with what differs, then command-line overrides.

    cfg = load_config("configs/mae_tiny_fmnist.yaml", ["optim.base_lr=3e-4", "train.epochs=2"])

Every key is checked when the config loads, against its type (the dataclass annotation below, or the
method's config dataclass for `model.*`) and its allowed range (`RULES`, `MODEL_RULES`). A bad value raises
`ConfigError` with one line naming the key, the value and what is allowed; `mimkit pretrain` prints it and
exits 2 before anything is built.

Ours, not Hydra / OmegaConf: dataclasses plus one YAML file give typed keys and one-line errors naming the
key, the value and the allowed range, with no extra dependency.

The resolved config is written next to the results (`config.yaml` in the run directory) and stored in
every checkpoint.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError


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
    # folder / shard images with more pixels are skipped with a warning after reading only their header
    # (default: Pillow's warning level; Pillow itself refuses only at twice that). None = no cap of ours.
    max_image_pixels: int | None = 89_478_485


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
    resume_force: bool = False  # resume even when batch size, seed or model differ from the checkpoint's
    compile: bool = False  # torch.compile the model
    online_probe: bool = False  # train a linear head on detached features (needs labels)
    distributed: str = "ddp"  # ddp | fsdp (FSDP2; used only when launched with several processes)
    activation_checkpointing: bool = False  # recompute block activations in backward (fsdp only)
    progress: bool = True
    matmul_ceiling: float | None = None  # FLOP/s for MFU; None = measured at start-up (about a second)


SECTIONS = {"data": DataConfig, "optim": OptimConfig, "train": TrainConfig}
DEFAULT_MODEL = "mae_vit_tiny_patch4_32"


@dataclass
class Config:
    model: dict[str, Any] = field(default_factory=lambda: {"name": DEFAULT_MODEL})
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


# ------------------------------------------------------------------ allowed values
# A rule is (test, what is allowed); it sees the value after the type check and is skipped for None.
Rule = tuple[Callable[[Any], bool], str]


def _at_least(low: float, what: str = "an integer", null: str = "") -> Rule:
    return (lambda v: v >= low), f"{what} >= {low:g}" + (f", or null {null}" if null else "")


def _positive(what: str = "a number", null: str = "") -> Rule:
    return (lambda v: v > 0), f"{what} > 0" + (f", or null {null}" if null else "")


def _one_of(*choices: str) -> Rule:
    return (lambda v: v in choices), "one of " + ", ".join(choices)


def _each(rule: Rule, what: str) -> Rule:
    test, _ = rule
    return (lambda v: all(test(x) for x in v)), what


RULES: dict[str, Rule] = {
    "data.source": (
        lambda v: v in ("folder", "fashion_mnist", "synthetic", "cifar10", "shards"),
        "one of the valid sources: folder, fashion_mnist, synthetic, cifar10, shards",
    ),
    "data.path": ((lambda v: v.strip() != ""), "a non-empty path, or null"),
    "data.split": ((lambda v: v.strip() != ""), "a non-empty split name such as train"),
    "data.num_samples": _at_least(1, null="for all"),
    "data.batch_size": _at_least(1),
    "data.num_workers": _at_least(0),
    "data.mean": ((lambda v: len(v) >= 1), "a list with one number per channel, or null"),
    "data.std": ((lambda v: len(v) >= 1 and all(x > 0 for x in v)), "a list of numbers > 0, one per channel"),
    "data.min_crop_scale": ((lambda v: 0 < v <= 1), "a number in (0, 1]"),
    "data.max_image_pixels": _at_least(1, null="for no cap"),
    "optim.base_lr": _positive(),
    "optim.lr": _positive(null="to use base_lr"),
    "optim.min_lr": _at_least(0, "a number"),
    "optim.weight_decay": _at_least(0, "a number"),
    "optim.betas": ((lambda v: all(0 <= b < 1 for b in v)), "two numbers in [0, 1), e.g. [0.9, 0.95]"),
    "optim.warmup_epochs": _at_least(0, "a number"),
    "optim.warmup_steps": _at_least(0, null="to use warmup_epochs"),
    "optim.accum_steps": _at_least(1),
    "optim.clip_grad": _positive(null="for no clipping"),
    "train.epochs": _positive(),
    "train.max_steps": _at_least(1, null="to use epochs"),
    "train.precision": _one_of("bf16", "fp32"),
    "train.seed": ((lambda v: 0 <= v < 2**63), "an integer >= 0"),
    "train.output_dir": ((lambda v: v.strip() != ""), "a non-empty folder path"),
    "train.device": _one_of("auto", "cpu", "cuda"),
    "train.log_every": _at_least(1),
    "train.ckpt_every": _at_least(1),
    "train.keep_every_epochs": _at_least(1, null="to keep none"),
    "train.resume": ((lambda v: v.strip() != ""), "a checkpoint path, auto, or null"),
    "train.distributed": _one_of("ddp", "fsdp"),
    "train.matmul_ceiling": _positive("a number of FLOP/s", null="to measure it"),
}

# model.* keys, by field name, for whichever method's config has them.
_DIMS = _each(_at_least(1), "integers >= 1")
MODEL_RULES: dict[str, Rule] = {
    "img_size": (
        lambda v: all(x > 0 for x in (v if isinstance(v, tuple) else (v,))),
        "an integer > 0 or [height, width] > 0",
    ),
    "patch_size": _at_least(1),
    "in_chans": _at_least(1),
    "embed_dim": _at_least(1),
    "depth": _at_least(1),
    "num_heads": _at_least(1),
    "mlp_ratio": _positive(),
    "decoder_embed_dim": _at_least(1),
    "decoder_depth": _at_least(0),
    "decoder_num_heads": _at_least(1),
    "regressor_depth": _at_least(0),
    "mask_ratio": ((lambda v: 0 < v < 1), "a number in (0, 1), e.g. 0.75"),
    "mask_kind": _one_of("random", "grid", "block"),
    "target": _one_of("pixel", "token"),
    "drop_path_rate": ((lambda v: 0 <= v < 1), "a number in [0, 1)"),
    "norm_eps": _positive(),
    "conv_norm_eps": _positive(),
    "align_weight": _at_least(0, "a number"),
    "momentum": ((lambda v: 0 <= v < 1), "a number in [0, 1)"),
    "layer_scale_init": _positive(null="for none"),
    "decoder_layer_scale_init": _positive(null="for none"),
    "teacher_mode": _one_of("train", "eval"),
    "tokenizer_path": ((lambda v: v.strip() != ""), "a tokenizer file path, or null"),
    "vocab_size": _at_least(1, null="for the tokenizer's codebook size"),
    "dw_kernel": _at_least(1),
    "strides": _DIMS,
    "embed_dims": _DIMS,
    "depths": _DIMS,
}


# ------------------------------------------------------------------ type checks
class _WrongType(Exception):
    pass


def _coerce(value: Any, hint: Any) -> Any:
    """`value` as the annotation `hint` asks (an int for a float, an integral float for an int), or raise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            try:
                return _coerce(value, arm)
            except _WrongType:
                pass
        raise _WrongType
    if hint is type(None):
        if value is None:
            return None
        raise _WrongType
    if isinstance(value, bool) and hint is not bool:  # YAML true/false is never a number or a string
        raise _WrongType
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)):  # e.g. train.output_dir=2024
            return str(value)
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
                if len(value) != len(args):
                    raise _WrongType
                return tuple(_coerce(v, a) for v, a in zip(value, args))
            items = [_coerce(v, args[0]) for v in value]
            return tuple(items) if origin is tuple else items
    else:
        return value  # an annotation this checker does not know: accepted as is
    raise _WrongType


_NAMES = {bool: ("true or false", "booleans"), int: ("an integer", "integers"), float: ("a number", "numbers"),
          str: ("a string", "strings"), type(None): ("null", "nulls")}  # fmt: skip


def describe_type(hint: Any) -> str:
    """What an annotation accepts, in words: `int | None` -> 'an integer or null'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in args)
    if origin in (list, tuple):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return f"a list of {len(args)} {_NAMES.get(args[0], ('', 'values'))[1]}"
        return f"a list of {_NAMES.get(args[0], ('', 'values'))[1]}"
    return _NAMES.get(hint, (getattr(hint, "__name__", str(hint)), ""))[0]


def _show(value: Any, limit: int = 60) -> str:
    """A value as it would be written in YAML, cut to `limit` characters (the message stays one line)."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif value is None:
        text = "null"
    elif isinstance(value, str):
        text = repr(value)
    else:
        text = str(list(value) if isinstance(value, tuple) else value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_value(key: str, value: Any, hint: Any, rule: Rule | None) -> Any:
    """`value` coerced to `hint` and tested against `rule`; ConfigError (one line) when it is not allowed."""
    try:
        coerced = _coerce(value, hint)
    except _WrongType:
        raise ConfigError(
            f"config key {key}={_show(value)} has the wrong type: expected {describe_type(hint)}"
        ) from None
    if rule is not None and coerced is not None:
        test, allowed = rule
        try:
            ok = bool(test(coerced))
        except TypeError:
            ok = False
        if not ok:
            raise ConfigError(f"config key {key}={_show(value)} is out of range: expected {allowed}")
    return coerced


# ------------------------------------------------------------------ building
def _describe_given(value: Any) -> str:
    kinds = {str: "string", list: "list", int: "integer", float: "number", bool: "boolean"}
    return f"the {kinds.get(type(value), type(value).__name__)} {_show(value)}"


def _build(cls, values: Any, where: str):
    if not isinstance(values, dict):
        raise ConfigError(
            f"config section '{where}' must be a mapping of keys (e.g. `{where}: {{...}}`), "
            f"got {_describe_given(values)}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in config section '{where}'; valid keys: {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    checked = {
        k: check_value(f"{where}.{k}", v, hints[k], RULES.get(f"{where}.{k}")) for k, v in values.items()
    }
    return cls(**checked)


def config_from_dict(d: Any) -> Config:
    if not isinstance(d, dict):
        raise ConfigError(
            f"a config must be a mapping of sections (model, data, optim, train), got {_describe_given(d)}"
        )
    unknown = sorted(set(d) - {"model", *SECTIONS})
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}; valid sections: model, data, optim, train")
    model = d.get("model")
    if model is None:
        model = {"name": DEFAULT_MODEL}
    if not isinstance(model, dict):
        raise ConfigError(
            f"config section 'model' must be a mapping such as `model: {{name: {DEFAULT_MODEL}}}`, "
            f"got {_describe_given(model)}"
        )
    model = {"name": DEFAULT_MODEL, **model}
    if not isinstance(model["name"], str):
        raise ConfigError(
            f"config key model.name={_show(model['name'])} has the wrong type: expected a string"
        )
    return Config(model=model, **{s: _build(cls, d.get(s) or {}, s) for s, cls in SECTIONS.items()})


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(err, 'problem', None) or type(err).__name__}{where}"


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (values parsed as YAML) to a nested config dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} is not of the form section.key=value (e.g. optim.base_lr=3e-4)"
            )
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"override key {key!r} must be section.key, e.g. train.epochs=10")
        section, name = parts
        try:
            value = parse_yaml(raw)
        except yaml.YAMLError as err:
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML ({_yaml_problem(err)})"
            ) from None
        if d.get(section) is None:
            d[section] = {}
        if not isinstance(d[section], dict):
            raise ConfigError(
                f"config section '{section}' must be a mapping of keys, got {_describe_given(d[section])}"
            )
        d[section][name] = value
    return d


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults + the YAML at `path` + `overrides`, every key type- and range-checked (ConfigError)."""
    d: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found (presets live in configs/)")
        try:
            d = parse_yaml(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(err)}") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"cannot read config file {path}: {err}") from None
        if d is None:
            d = {}
        if not isinstance(d, dict):
            raise ConfigError(
                f"config file {path} must hold a mapping of sections (model, data, optim, train), "
                f"got {_describe_given(d)}"
            )
    cfg = config_from_dict(apply_overrides(d, overrides or []))
    validate(cfg)
    return cfg


def _check_model(cfg: Config) -> Any:
    """Type- and range-check the model keys against the method's config dataclass; returns that config."""
    from ..registry import model_config

    try:
        method_config = model_config(cfg.model_name)
    except ValueError as err:  # an unknown name, with the closest matches
        raise ConfigError(f"config key model.name: {err}") from None
    hints = typing.get_type_hints(type(method_config))
    for key in list(cfg.model_overrides):
        if key not in hints:
            continue  # model_config below names the valid options
        value = check_value(f"model.{key}", cfg.model[key], hints[key], MODEL_RULES.get(key))
        cfg.model[key] = list(value) if isinstance(value, tuple) else value  # YAML-friendly
    try:
        return model_config(cfg.model_name, **cfg.model_overrides)
    except ValueError as err:  # an unknown option, with the valid ones
        raise ConfigError(f"config section model: {err}") from None


def _check_model_shapes(cfg: Config, method_config: Any) -> None:
    """Keys that must fit each other: heads divide widths, patches tile the image (named, not a layer's error)."""
    c = dataclasses.asdict(method_config)
    widths = [("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")]
    for width, heads in widths:
        w, h = c.get(width), c.get(heads)
        if isinstance(w, int) and isinstance(h, int) and w % h:
            raise ConfigError(
                f"config keys model.{width}={w} and model.{heads}={h} do not fit: expected {width} divisible "
                f"by {heads} (e.g. {heads}={max(d for d in range(1, h + 1) if w % d == 0)})"
            )
    size, patch = c.get("img_size"), c.get("patch_size")
    if isinstance(patch, int) and size is not None:
        sizes = size if isinstance(size, (list, tuple)) else [size]
        if any(x % patch for x in sizes):
            raise ConfigError(
                f"config keys model.img_size={_show(size)} and model.patch_size={patch} do not fit: expected "
                "an image size that is a multiple of the patch size"
            )


def validate(cfg: Config) -> None:
    """Cross-key checks (and the model keys); single keys were checked when the sections were built."""
    if cfg.train.online_probe and cfg.train.distributed == "fsdp":
        raise ConfigError(
            "train.online_probe is not supported with train.distributed=fsdp; use ddp or turn it off"
        )
    method_config = _check_model(cfg)
    _check_model_shapes(cfg, method_config)
    in_chans = getattr(method_config, "in_chans", None)
    for key in ("mean", "std"):
        values = getattr(cfg.data, key)
        if values is not None and in_chans is not None and len(values) != in_chans:
            raise ConfigError(
                f"config key data.{key}={_show(values)} has {len(values)} value(s) but the model has "
                f"in_chans={in_chans}: expected one value per channel, or null for the source's statistics"
            )


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
