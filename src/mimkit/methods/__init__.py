"""Pretraining methods. Importing this package registers every method's named presets."""

from .base import MIMOutput
from .mae import MAE, MAEConfig

__all__ = ["MAE", "MAEConfig", "MIMOutput"]
