"""The contracts between the parts, in code: what a method and an encoder must offer (checked by mypy where
the code is typed, and by `registry.create_model` when a model is built), and the optional hooks the trainer,
visualizer and FLOP counter call when a model has them (`isinstance(model, AfterOptimizerStep)`).

docs/design.md explains each in prose; these classes are the reference.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from .methods.base import LossTerms, MIMOutput

__all__ = [
    "AfterOptimizerStep",
    "CountsFlops",
    "Encoder",
    "ExtraReconstructions",
    "LossTerms",
    "ModuleLike",
    "MIMMethod",
    "MIMOutput",
    "Tokenizer",
    "as_method",
]


class ModuleLike(Protocol):
    """The part of `nn.Module` that code holding an `Encoder` or a `MIMMethod` uses (typing has no "and")."""

    training: bool

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...

    def to(self, *args: Any, **kwargs: Any) -> Any: ...

    def modules(self) -> Iterator[nn.Module]: ...


@runtime_checkable
class Encoder(ModuleLike, Protocol):
    """An encoder used by probes, fine-tuning, export and layer-wise lr decay (ViT, ConvViT)."""

    num_prefix_tokens: int  # 1 = a class token first, 0 = none
    embed_dim: int

    @property
    def num_layers(self) -> int: ...

    @property
    def blocks(self) -> nn.ModuleList: ...

    def forward_features(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, C, H, W] (and a [B, L] bool mask, True = dropped) -> [B, prefix + visible, D], normed."""
        ...

    def no_weight_decay(self) -> set[str]: ...

    def layer_id(self, param_name: str) -> int:
        """0 = embeddings, i + 1 = blocks.i, num_layers + 1 = the final norm and anything after it."""
        ...


@runtime_checkable
class MIMMethod(ModuleLike, Protocol):
    """A pretraining method (MAE, CAE, ConvMAE): what the trainer, probes and exporters rely on."""

    method: str  # short id: "mae", "cae", "convmae"
    config: Any  # the method's frozen config dataclass
    patch_size: int  # of the prediction targets
    grid_size: tuple[int, int]  # target patches per image, rows x columns

    @property
    def encoder(self) -> Encoder: ...

    def mask_generator(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor: ...

    def __call__(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> MIMOutput: ...

    def forward_encoder(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Tokenizer(ModuleLike, Protocol):
    """A discrete tokenizer for token targets (CAE): images as the model sees them -> code ids per patch."""

    @property
    def codebook_size(self) -> int: ...

    def grid_size(self, img_size: Any) -> tuple[int, int]: ...

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, L] long."""
        ...


@runtime_checkable
class AfterOptimizerStep(Protocol):
    """Called by the trainer after every optimizer step (CAE's EMA teacher)."""

    def after_optimizer_step(self) -> None: ...


@runtime_checkable
class ExtraReconstructions(Protocol):
    """Further pixel predictions for the visualizer, titled: {title: [B, L, p*p*C]} (CAE without regressor)."""

    def extra_reconstructions(self, images: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class CountsFlops(Protocol):
    """An exact matmul-FLOP count per image; `engine.perf` measures models without one."""

    def flops_per_image(self, training: bool = True) -> int: ...


def as_method(model: nn.Module) -> MIMMethod:
    """`model` seen through the method contract; TypeError naming what is missing when it does not fulfil it."""
    if not isinstance(model, MIMMethod):
        missing = [name for name in _METHOD_MEMBERS if not hasattr(model, name)]
        raise TypeError(f"{type(model).__name__} is not a mimkit method: it lacks {', '.join(missing)}")
    return model


_METHOD_MEMBERS = (
    "method",
    "config",
    "patch_size",
    "grid_size",
    "encoder",
    "mask_generator",
    "forward_encoder",
)
