from .curves import plot_loss_curve
from .reconstruction import pixel_predictions, reconstruction_grid, save_reconstructions

__all__ = ["pixel_predictions", "plot_loss_curve", "reconstruction_grid", "save_reconstructions"]
