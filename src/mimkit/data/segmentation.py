"""Datasets for dense prediction: item i -> (PIL image, mask [H, W] int64 of class ids, 255 = ignore).

- `GarmentCanvas`: Fashion-MNIST garments (real images) placed without overlap on an empty canvas; each
  pixel is background (0) or, where the garment's intensity exceeds `threshold`, its class + 1. Item i is a
  pure function of (seed, split, i): the garments drawn, their number and their places.
- `SegmentationFolder`: any folder of image + mask PNG pairs, `DIR/images/NAME.* + DIR/masks/NAME.png`
  or `DIR/NAME.* + DIR/NAME_mask.png`, optionally under `DIR/train/` and `DIR/test/`; mask pixel values
  are class ids (255 = ignore), `DIR/classes.txt` (one name per line) names them.
- `write_segmentation_folder` writes any of these as such a folder; `DenseTransform` resizes and normalises
  an (image, mask) pair together.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..layers.patch_embed import to_2tuple
from .fashion_mnist import CLASSES, FashionMNIST
from .folder import IMG_EXTENSIONS, mode_for_channels, to_mode
from .mim_dataset import mix_seed

IGNORE_INDEX = 255
_SPLIT_STREAM = {"train": 0, "test": 1}


class GarmentCanvas(torch.utils.data.Dataset):
    """Fashion-MNIST garments on a `canvas_size` canvas, 1 to `max_garments` per image, non-overlapping.

    garments: the source of garments (default: Fashion-MNIST's `split`), anything with `images`
    [N, h, w] uint8 and `labels` [N] arrays. Placement: each garment gets up to 50 random tries for a spot
    whose box overlaps no earlier box; one that finds none is left out (so small canvases hold fewer).
    classes: "background", then the garment classes; class id = garment label + 1.
    """

    def __init__(
        self,
        split: str = "train",
        num_samples: int = 2000,
        canvas_size: int = 64,
        max_garments: int = 4,
        threshold: int = 25,
        seed: int = 0,
        garments=None,
        root: str | os.PathLike | None = None,
    ):
        if split not in _SPLIT_STREAM:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.garments = garments if garments is not None else FashionMNIST(root, split=split)
        self.split, self.num_samples, self.seed = split, int(num_samples), int(seed)
        self.canvas_size = to_2tuple(canvas_size)
        self.max_garments, self.threshold = int(max_garments), int(threshold)
        gh, gw = self.garments.images.shape[1:]
        if gh > self.canvas_size[0] or gw > self.canvas_size[1]:
            raise ValueError(f"garments of {gh}x{gw} px do not fit on a {self.canvas_size} canvas")
        names = getattr(self.garments, "classes", None) or CLASSES
        self.classes = ["background", *names]
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return self.num_samples

    def layout(self, index: int) -> list[tuple[int, int, int]]:
        """[(garment index, top, left)] of item `index`, a pure function of (seed, split, index)."""
        rng = np.random.default_rng(mix_seed(self.seed, _SPLIT_STREAM[self.split], index))
        H, W = self.canvas_size
        gh, gw = self.garments.images.shape[1:]
        boxes: list[tuple[int, int, int]] = []
        for _ in range(int(rng.integers(1, self.max_garments + 1))):
            garment = int(rng.integers(len(self.garments.images)))
            for _try in range(50):
                top, left = int(rng.integers(H - gh + 1)), int(rng.integers(W - gw + 1))
                if all(abs(top - t) >= gh or abs(left - s) >= gw for _, t, s in boxes):
                    boxes.append((garment, top, left))
                    break
        return boxes

    def arrays(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image [H, W] uint8, mask [H, W] int64) of item `index`."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} canvases")
        image = np.zeros(self.canvas_size, dtype=np.uint8)
        mask = np.zeros(self.canvas_size, dtype=np.int64)
        gh, gw = self.garments.images.shape[1:]
        for garment, top, left in self.layout(index):
            pixels = self.garments.images[garment]  # [gh, gw] uint8
            image[top : top + gh, left : left + gw] = pixels
            label = int(self.garments.labels[garment]) + 1
            mask[top : top + gh, left : left + gw] = np.where(pixels > self.threshold, label, 0)
        return image, mask

    def __getitem__(self, index: int) -> tuple[Image.Image, torch.Tensor]:
        image, mask = self.arrays(index)
        return Image.fromarray(image), torch.from_numpy(mask)

    def __repr__(self) -> str:
        return (f"GarmentCanvas(split={self.split!r}, samples={self.num_samples}, canvas={self.canvas_size}, "
                f"max_garments={self.max_garments}, seed={self.seed})")  # fmt: skip


def _pairs(root: Path) -> list[tuple[Path, Path]]:
    """(image, mask) paths under `root` in either layout, sorted by name."""

    def is_image(p: Path) -> bool:
        return p.is_file() and p.suffix.lower() in IMG_EXTENSIONS

    if (root / "images").is_dir() and (root / "masks").is_dir():
        masks = {p.stem: p for p in (root / "masks").iterdir() if p.suffix.lower() == ".png"}
        images = sorted(p for p in (root / "images").iterdir() if is_image(p))
        return [(p, masks[p.stem]) for p in images if p.stem in masks]
    files = sorted(p for p in root.iterdir() if is_image(p))
    masks = {
        p.stem[: -len("_mask")]: p for p in files if p.stem.endswith("_mask") and p.suffix.lower() == ".png"
    }
    return [(p, masks[p.stem]) for p in files if not p.stem.endswith("_mask") and p.stem in masks]


class SegmentationFolder(torch.utils.data.Dataset):
    """Image + mask PNG pairs from a folder (layouts in the module doc); `split` picks `DIR/<split>/` when
    it exists. Masks are read as class ids (mode "L" or "P"; 255 = ignore). classes: `classes.txt` if
    present (in DIR or DIR/<split>), else "class0".. up to the largest id found (`num_classes`)."""

    def __init__(self, root: str | os.PathLike, split: str | None = None, num_classes: int | None = None):
        root = Path(root).expanduser()
        base = root / split if split and (root / split).is_dir() else root
        if not base.is_dir():
            raise FileNotFoundError(f"segmentation folder {str(base)!r} does not exist")
        self.root = base
        self.samples = _pairs(base)
        if not self.samples:
            raise FileNotFoundError(
                f"no image + mask pairs in {str(base)!r}: put images in images/ and same-named PNG masks in "
                "masks/, or NAME.png next to NAME_mask.png (mask pixel = class id, 255 = ignore)"
            )
        names_file = next((d / "classes.txt" for d in (base, root) if (d / "classes.txt").is_file()), None)
        if names_file is not None:
            self.classes = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        else:
            if num_classes is None:
                found = max(
                    int(m[m != IGNORE_INDEX].max(initial=0)) for m in (self.mask(i) for i in range(len(self)))
                )
                num_classes = found + 1
            self.classes = [f"class{i}" for i in range(num_classes)]
        self.num_classes = num_classes or len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def mask(self, index: int) -> np.ndarray:
        with Image.open(self.samples[index][1]) as m:
            if m.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(
                    f"mask {str(self.samples[index][1])!r} has mode {m.mode}; masks must be single-channel "
                    "PNGs whose pixel values are class ids"
                )
            return np.asarray(m, dtype=np.int64)

    def __getitem__(self, index: int) -> tuple[Image.Image, torch.Tensor]:
        with Image.open(self.samples[index][0]) as img:
            img.load()
            image = img.copy()
        mask = self.mask(index)
        if mask.shape != (image.height, image.width):
            raise ValueError(
                f"mask {str(self.samples[index][1])!r} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                f"{image.width}x{image.height}; a mask must have its image's size"
            )
        return image, torch.from_numpy(mask)

    def __repr__(self) -> str:
        return f"SegmentationFolder({str(self.root)!r}, pairs={len(self)}, classes={self.num_classes})"


def write_segmentation_folder(dataset, out: str | os.PathLike, limit: int | None = None) -> Path:
    """Write (image, mask) items as `out/images/NNNNNN.png` + `out/masks/NNNNNN.png` and `out/classes.txt`."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for i in range(n):
        image, mask = dataset[i]
        image.save(out / "images" / f"{i:06d}.png")
        Image.fromarray(mask.numpy().astype(np.uint8), mode="L").save(out / "masks" / f"{i:06d}.png")
    if getattr(dataset, "classes", None):
        (out / "classes.txt").write_text("\n".join(dataset.classes) + "\n")
    return out


class DenseTransform:
    """(PIL image, mask [h, w]) -> (image [C, H, W] float32 normalised, mask [H, W] int64) at `size`:
    the image resized bilinearly, the mask by nearest neighbour (no crop: the whole image is labelled)."""

    def __init__(
        self, size: int | tuple[int, int], in_chans: int, mean: Sequence[float], std: Sequence[float]
    ):
        self.size = to_2tuple(size)
        self.mode = mode_for_channels(in_chans)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: Image.Image, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        H, W = self.size
        image = to_mode(image, self.mode)
        if image.size != (W, H):
            image = image.resize((W, H), Image.Resampling.BILINEAR)
            mask = torch.nn.functional.interpolate(mask[None, None].float(), size=(H, W), mode="nearest")
            mask = mask[0, 0].long()
        pixels = torch.from_numpy(np.array(image, dtype=np.float32) / 255.0)
        pixels = pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1)  # [C, H, W]
        return (pixels - self.mean) / self.std, mask
