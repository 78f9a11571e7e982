"""Named model presets: `create_model('mae_vit_base_patch16_224', img_size=192)`."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

_PRESETS: dict[str, tuple[type[nn.Module], Any]] = {}


def register_model(name: str, method_cls: type[nn.Module], config: Any) -> None:
    """Register `name` as `method_cls(config)`; `config` is the method's config dataclass instance."""
    if name in _PRESETS:
        raise ValueError(f"model {name!r} is registered twice")
    _PRESETS[name] = (method_cls, config)


def _ensure_methods_loaded() -> None:
    """Import every module of `mimkit.methods`; each registers its presets when imported."""
    import importlib
    import pkgutil

    from . import methods

    for info in pkgutil.iter_modules(methods.__path__):
        importlib.import_module(f"{methods.__name__}.{info.name}")


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a glob pattern, sorted."""
    import fnmatch

    _ensure_methods_loaded()
    return sorted(n for n in _PRESETS if fnmatch.fnmatch(n, pattern))


def model_config(name: str, **overrides: Any) -> Any:
    """The preset's config dataclass with `overrides` applied (unknown fields raise a clear error)."""
    _ensure_methods_loaded()
    if name not in _PRESETS:
        import difflib

        close = difflib.get_close_matches(name, _PRESETS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see mimkit.list_models()"
        raise ValueError(f"unknown model {name!r}{hint}")
    _, config = _PRESETS[name]
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"{name} has no option(s) {unknown}; valid options: {sorted(fields)}")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return dataclasses.replace(config, **overrides)


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model, e.g. `create_model('mae_vit_tiny_patch4_32', in_chans=1)`."""
    config = model_config(name, **overrides)
    method_cls, _ = _PRESETS[name]
    from .protocols import as_method  # here: protocols imports the methods package, which imports this

    model = method_cls(config)
    as_method(model)  # TypeError naming what a method lacks of the contract (protocols.MIMMethod)
    setattr(model, "model_name", name)  # noqa: B010  a plain attribute (nn.Module's __setattr__ is typed for tensors)
    return model
