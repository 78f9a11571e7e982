"""Reconstruction pictures: original | masked | reconstruction | reconstruction with visible patches pasted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..targets import patch_stats, patchify, unpatchify


def pixel_predictions(model: Any, images: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Turn a method's pixel predictions [B, L, p*p*C] back into normalised-image space [B, C, H, W].

    With norm-pix targets each predicted patch is un-normalised by the statistics of the same patch of
    the original image, so the picture looks like the image rather than like a contrast map.
    """
    target = patchify(images, model.patch_size)  # [B, L, p*p*C]
    if pred.shape != target.shape:
        raise ValueError(
            f"{type(model).__name__} predicts {tuple(pred.shape)}, not pixels {tuple(target.shape)}; "
            "pictures need a pixel target"
        )
    if getattr(model.config, "norm_pix_loss", False):
        mean, std = patch_stats(target)
        pred = pred * std + mean
    return unpatchify(pred, model.patch_size, model.grid_size, images.shape[1])


def with_visible_patches(
    model: Any, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Pixel predictions [B, L, p*p*C] as images [B, C, H, W], the visible patches (mask False) taken from
    `images`: what a reconstruction looks like next to the input."""
    masked_px = _expand_mask(model, mask, images.shape[1])
    return pixel_predictions(model, images, pred.float()) * masked_px + images * (1 - masked_px)


def _to_display(x: torch.Tensor, mean, std) -> np.ndarray:
    """[C, H, W] normalised -> [H, W, 3] in [0, 1]."""
    mean = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    std = torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
    x = (x * std + mean).clamp(0, 1)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return x[:3].permute(1, 2, 0).cpu().numpy()


def _expand_mask(model, mask: torch.Tensor, channels: int) -> torch.Tensor:
    """[B, L] bool -> [B, C, H, W] float, 1 on masked pixels."""
    ph, pw = (model.patch_size, model.patch_size) if isinstance(model.patch_size, int) else model.patch_size
    m = mask.float()[..., None].expand(-1, -1, ph * pw * channels)
    return unpatchify(m, model.patch_size, model.grid_size, channels)


@torch.no_grad()
def reconstruction_grid(
    model, images: torch.Tensor, mask: torch.Tensor, mean, std, extra: dict[str, torch.Tensor] | None = None
) -> tuple[list[str], list[list[np.ndarray]]]:
    """Columns (titles) and rows of display images for each input image.

    extra: further pixel predictions [B, L, p*p*C] to show as columns (e.g. CAE without its regressor).
    """
    out = model(images, mask)
    predictions = {"reconstruction": out.pred, **(extra or {})}
    masked_px = _expand_mask(model, mask, images.shape[1])  # [B, C, H, W]
    columns = {"original": images, "masked": images * (1 - masked_px) + masked_px * _gray(images, mean, std)}
    for name, pred in predictions.items():
        columns[name] = pixel_predictions(model, images, pred.float())
        columns[f"{name} + visible"] = with_visible_patches(model, images, pred, mask)
    titles = list(columns)
    rows = [[_to_display(columns[t][i], mean, std) for t in titles] for i in range(images.shape[0])]
    return titles, rows


def _gray(images: torch.Tensor, mean, std) -> torch.Tensor:
    """The normalised value of mid-gray, per channel: what masked patches are painted with."""
    m = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return (0.5 - m) / s


def save_reconstructions(
    titles: list[str], rows: list[list[np.ndarray]], out_path: str | Path, scale: float = 1.6
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(rows), len(titles)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(scale * n_cols, scale * n_rows), squeeze=False, dpi=110)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            ax = axes[r][c]
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=8)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
