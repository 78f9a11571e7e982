"""mimkit: masked image modeling (MAE, CAE, ConvMAE) — pretrain, evaluate and export vision encoders."""

from .registry import create_model, list_models, model_config

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "model_config", "__version__"]
