"""Per-sample seeded dataset wrapper: augmentation and mask of sample i are a pure function of (seed, epoch, i).

That makes a run independent of the number of data-loader workers and of the number of processes, and
makes resuming in the middle of an epoch exact: nothing depends on which process drew what before.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*values: int) -> int:
    """Hash integers into a well-spread 63-bit seed (order-sensitive): mix_seed(seed, epoch, i, stream)."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h >> 1


TRANSFORM_STREAM, MASK_STREAM = 0, 1


class MIMDataset(torch.utils.data.Dataset):
    """Wraps a base dataset of (PIL image, int label): item i -> (image [C, H, W] float32, mask [L] bool, label).

    The transform runs under a forked torch RNG seeded with mix_seed(seed, epoch, i, 0) (python's `random`
    is seeded the same way and restored afterwards); the mask is `mask_generator(1, generator)[0]` with a
    generator seeded mix_seed(seed, epoch, i, 1). Without a mask generator, mask is an empty bool tensor [0].
    The caller's RNG states are left untouched. Call `set_epoch` before each epoch (workers must be
    non-persistent, or re-created, to see it).
    """

    def __init__(
        self,
        base: Any,  # a map-style dataset of (PIL image, label), with len()
        transform: Callable,
        mask_generator: Callable[..., torch.Tensor] | None = None,
        seed: int = 0,
    ):
        self.base = base
        self.transform = transform
        self.mask_generator = mask_generator
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def classes(self) -> list[str] | None:
        return getattr(self.base, "classes", None)

    @property
    def num_classes(self) -> int | None:
        return getattr(self.base, "num_classes", None)

    @property
    def num_bad(self) -> int:
        """Unreadable files skipped so far by the base dataset (0 for in-memory sources)."""
        return getattr(self.base, "num_bad", 0)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        img, label = self.base[index]
        sample_seed = mix_seed(self.seed, self.epoch, index, TRANSFORM_STREAM)
        py_state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(
                    sample_seed
                )  # CPU only: torch.manual_seed is ~100x slower
                random.seed(sample_seed)
                image = self.transform(img)  # [C, H, W] float32
        finally:
            random.setstate(py_state)
        if self.mask_generator is None:
            mask = torch.zeros(0, dtype=torch.bool)  # [0]
        else:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, index, MASK_STREAM))
            mask = self.mask_generator(1, generator=gen)[0]  # [L] bool
        return image, mask, int(label)

    def __repr__(self) -> str:
        return (
            f"MIMDataset({self.base!r}, seed={self.seed}, epoch={self.epoch}, mask={self.mask_generator!r})"
        )
