"""mimkit: masked image modeling (MAE, CAE, ConvMAE) — pretrain, evaluate and export vision encoders.

model = mimkit.create_model("mae_vit_base_patch16_224")   # a preset (see mimkit.list_models())
model = mimkit.load("runs/photos/checkpoint.pt")           # anything mimkit writes (see mimkit.load)
"""

from __future__ import annotations

import os
from typing import Any

from .registry import create_model, list_models, model_config

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "load", "model_config", "__version__"]


def load(path: str | os.PathLike, eval_transform: bool = False) -> Any:
    """Load any file mimkit writes: checkpoint.pt, encoder.safetensors, an export (timm, hf, safetensors)
    or a fine-tuned classifier.pt. Returns the model (whole model, encoder or classifier, in eval mode, with
    `.mimkit_info` holding its config and preprocessing); with eval_transform=True, (model, transform).
    See `mimkit.interop.loading` for what each file gives.
    """
    from .interop.loading import load as _load

    return _load(path, eval_transform=eval_transform)
