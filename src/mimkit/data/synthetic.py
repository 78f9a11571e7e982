"""Deterministic synthetic images with class structure, for smoke tests and benchmarks (no files needed)."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from ..layers.patch_embed import to_2tuple
from .folder import mode_for_channels


class SyntheticImages(torch.utils.data.Dataset):
    """`num_samples` images; item i -> (PIL image "L" or "RGB" of size img_size, int label = i % num_classes).

    Each image is an oriented sinusoidal grating (orientation and frequency set by the class, with jitter and a
    random phase) plus a Gaussian blob at a random place and pixel noise; RGB images are tinted with a
    class-dependent colour. Item i depends only on (seed, i), so any worker or process draws the same image,
    and a linear probe can learn the classes from the pixels.
    """

    def __init__(
        self,
        num_samples: int,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 10,
        seed: int = 0,
    ):
        if num_samples <= 0 or num_classes <= 0:
            raise ValueError(f"need num_samples > 0 and num_classes > 0, got {num_samples}, {num_classes}")
        self.num_samples = num_samples
        self.img_size = to_2tuple(img_size)
        self.mode = mode_for_channels(in_chans)
        self.num_classes = num_classes
        self.classes = [f"class_{k}" for k in range(num_classes)]
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} synthetic images")
        label = index % self.num_classes
        rng = np.random.default_rng([self.seed, index])
        h, w = self.img_size
        y, x = np.meshgrid(
            np.linspace(0, 1, h, endpoint=False), np.linspace(0, 1, w, endpoint=False), indexing="ij"
        )
        theta = math.pi * label / self.num_classes + rng.normal(0.0, 0.05)
        freq = (3 + 2 * (label % 3)) * (1 + rng.normal(0.0, 0.05))  # cycles per image side
        phase = rng.uniform(0, 2 * math.pi)
        grating = np.cos(2 * math.pi * freq * (x * math.cos(theta) + y * math.sin(theta)) + phase)  # [H, W]
        cy, cx = rng.uniform(0.2, 0.8, size=2)
        blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * 0.12**2))  # [H, W]
        img = 0.5 + 0.3 * grating + 0.3 * blob * (1 if label % 2 else -1)  # [H, W] in about [0, 1]
        if self.mode == "RGB":
            hue = 2 * math.pi * label / self.num_classes
            tint = 0.75 + 0.25 * np.cos(hue + np.array([0.0, 2 * math.pi / 3, 4 * math.pi / 3]))  # [3]
            img = img[..., None] * tint  # [H, W, 3]
        img = img + rng.normal(0.0, 0.05, size=img.shape)
        return Image.fromarray(np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)), label

    def __repr__(self) -> str:
        return f"SyntheticImages(samples={self.num_samples}, size={self.img_size}, mode={self.mode}, seed={self.seed})"
