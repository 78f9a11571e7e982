from .curves import plot_loss_curve
from .reconstruction import pixel_predictions, reconstruction_grid, save_reconstructions
from .tensorboard import log_run_pictures

__all__ = [
    "log_run_pictures",
    "pixel_predictions",
    "plot_loss_curve",
    "reconstruction_grid",
    "save_reconstructions",
]
