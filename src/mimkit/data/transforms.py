"""Image transforms (torchvision): MAE's pretraining augmentation and a deterministic eval transform.

Both take a PIL image of any mode and size and return a float32 tensor [C, H, W], normalized. All their
randomness comes from torch's global RNG, which MIMDataset seeds per sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from ..layers.patch_embed import to_2tuple
from .folder import mode_for_channels, to_mode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)


def default_mean_std(source: str, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalization stats: Fashion-MNIST's own for "fashion_mnist" (repeated per channel), ImageNet's for
    other 3-channel data, 0.5 / 0.5 otherwise."""
    if source == "fashion_mnist":
        return FASHION_MNIST_MEAN * in_chans, FASHION_MNIST_STD * in_chans
    if in_chans == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.5,) * in_chans, (0.5,) * in_chans


class ConvertMode:
    """PIL image of any mode -> "L" (in_chans=1) or "RGB" (in_chans=3), so every source fits the model."""

    def __init__(self, in_chans: int):
        self.mode = mode_for_channels(in_chans)

    def __call__(self, img: Image.Image) -> Image.Image:
        return to_mode(img, self.mode)

    def __repr__(self) -> str:
        return f"ConvertMode({self.mode!r})"


class ResizeCover:
    """Resize keeping the aspect ratio to the smallest size that covers `size` (h, w); a crop follows."""

    def __init__(self, size: tuple[int, int], interpolation=InterpolationMode.BICUBIC):
        self.size = size
        self.interpolation = interpolation

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        scale = max(self.size[0] / h, self.size[1] / w)
        new = (max(self.size[0], int(h * scale)), max(self.size[1], int(w * scale)))  # as torchvision/timm
        return F.resize(img, list(new), interpolation=self.interpolation)

    def __repr__(self) -> str:
        return f"ResizeCover({self.size})"


# Ours, not torchvision's ToTensor + Normalize: one pass instead of two over every image.
class ToNormalizedTensor:
    """PIL image -> float32 tensor [C, H, W] = (pixel / 255 - mean) / std, i.e. ToTensor + Normalize fused
    into one pass (several times faster on small images, where the data loader is the bottleneck)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = tuple(mean), tuple(std)
        std_t = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)  # [C, 1, 1]
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = -torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1) / std_t

    def __call__(self, img: Image.Image) -> torch.Tensor:
        pixels = np.asarray(img, dtype=np.float32)  # [H, W] or [H, W, C]
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if pixels.shape[2] != len(self.mean):
            raise ValueError(f"image has {pixels.shape[2]} channels, mean/std have {len(self.mean)}")
        x = torch.from_numpy(pixels).permute(2, 0, 1)  # [C, H, W]
        return torch.addcmul(self._shift, x, self._scale).contiguous()

    def __repr__(self) -> str:
        return f"ToNormalizedTensor(mean={self.mean}, std={self.std})"


def _to_tensor(in_chans: int, mean: Sequence[float], std: Sequence[float]) -> ToNormalizedTensor:
    if len(mean) != in_chans or len(std) != in_chans:
        raise ValueError(
            f"mean/std need {in_chans} values for in_chans={in_chans}, got {len(mean)} and {len(std)}"
        )
    return ToNormalizedTensor(mean, std)


def pretrain_transform(
    img_size: int | tuple[int, int],
    in_chans: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    scale: tuple[float, float] = (0.2, 1.0),
) -> T.Compose:
    """MAE's augmentation: RandomResizedCrop(scale 0.2-1, bicubic) + horizontal flip -> [C, H, W] float32.

    img_size: int (square) or (height, width). mean/std default to 0.5 per channel.
    """
    size = to_2tuple(img_size)
    mean = mean if mean is not None else (0.5,) * in_chans
    std = std if std is not None else (0.5,) * in_chans
    return T.Compose(
        [
            ConvertMode(in_chans),
            T.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            _to_tensor(in_chans, mean, std),
        ]
    )


def eval_transform(
    img_size: int | tuple[int, int],
    in_chans: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_pct: float | None = None,
) -> T.Compose:
    """Deterministic: resize keeping the aspect ratio so the image covers img_size / crop_pct, center crop.

    crop_pct defaults to 0.875 (224/256, timm's convention for photos) for RGB at >= 64 px, and to 1.0
    (resize, then crop only what the aspect ratio forces) for grayscale or tiny images such as Fashion-MNIST.
    """
    size = to_2tuple(img_size)
    if crop_pct is None:
        crop_pct = default_crop_pct(size, in_chans)
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    mean = mean if mean is not None else (0.5,) * in_chans
    std = std if std is not None else (0.5,) * in_chans
    cover = (int(size[0] / crop_pct), int(size[1] / crop_pct))
    return T.Compose(
        [ConvertMode(in_chans), ResizeCover(cover), T.CenterCrop(size), _to_tensor(in_chans, mean, std)]
    )


def default_crop_pct(img_size: Any, in_chans: int) -> float:
    """The centre-crop fraction `eval_transform` uses by default."""
    size = to_2tuple(img_size)
    return 0.875 if in_chans == 3 and min(size) >= 64 else 1.0


def preprocessing(model_config: dict[str, Any], data: dict[str, Any] | None = None) -> dict[str, Any]:
    """What an image must go through before the encoder, as the model was trained and evaluated:
    {"input_size": [C, H, W], "mean", "std", "interpolation": "bicubic", "crop_pct", "crop_mode": "center"}.

    `data` is the `data` section of the training config (source, mean, std); without it, the usual
    statistics for the channel count are assumed (ImageNet's for RGB).
    """
    data = data or {}
    in_chans = int(model_config.get("in_chans", 3))
    h, w = to_2tuple(model_config.get("img_size", 224))
    mean, std = default_mean_std(data.get("source") or "folder", in_chans)
    return {
        "input_size": [in_chans, int(h), int(w)],
        "mean": [float(v) for v in (data.get("mean") or mean)],
        "std": [float(v) for v in (data.get("std") or std)],
        "interpolation": "bicubic",
        "crop_pct": default_crop_pct((h, w), in_chans),
        "crop_mode": "center",
        "data_source": data.get("source"),
    }
