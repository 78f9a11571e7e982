"""Mask generators: random (MAE), block-wise (BEiT/CAE), grid, and multi-scale upsampling (ConvMAE).

Every generator returns a bool tensor [B, L] over the patch grid in row-major order, True = masked,
with exactly the same number of masked patches in every image (so visible tokens stack into
[B, keep, D]). They take an optional `torch.Generator`, so a mask is reproducible from a seed, and are
cheap enough to run in a data-loader worker.
"""

from __future__ import annotations

import math
import random

import torch

from .layers.patch_embed import to_2tuple


def random_mask(
    batch_size: int, num_patches: int, mask_ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """MAE masking: the int(L * (1 - ratio)) patches with the lowest uniform noise stay visible."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    keep = int(num_patches * (1 - mask_ratio))
    noise = torch.rand(batch_size, num_patches, generator=generator)  # [B, L]
    ids_keep = noise.argsort(dim=1)[:, :keep]  # [B, keep]
    mask = torch.ones(batch_size, num_patches, dtype=torch.bool)
    return mask.scatter_(1, ids_keep, False)


def _python_rng(generator: torch.Generator | None) -> random.Random:
    return random.Random(int(torch.randint(2**62, (1,), generator=generator)))


def block_mask(
    batch_size: int,
    grid_size: tuple[int, int],
    num_masked: int,
    min_block: int = 16,
    min_aspect: float = 0.3,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """BEiT block-wise masking with exactly `num_masked` patches per image.

    Rectangles of random area (>= `min_block` patches, never more than still needed) and aspect ratio in
    [min_aspect, 1/min_aspect] are placed until the count is reached. When no rectangle fits any more
    (rare, near the target), the remaining patches are drawn uniformly so the count is always exact.
    """
    rows, cols = grid_size
    if not 0 <= num_masked <= rows * cols:
        raise ValueError(f"cannot mask {num_masked} of {rows * cols} patches")
    rng = _python_rng(generator)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    masks = torch.zeros(batch_size, rows, cols, dtype=torch.bool)
    for m in masks:
        count = 0
        while count < num_masked:
            budget = num_masked - count
            added = 0
            for _attempt in range(10):
                area = rng.uniform(min(min_block, budget), budget)
                aspect = math.exp(rng.uniform(*log_aspect))
                h = int(round(math.sqrt(area * aspect)))
                w = int(round(math.sqrt(area / aspect)))
                if not (0 < h < rows and 0 < w < cols):
                    continue
                top, left = rng.randint(0, rows - h), rng.randint(0, cols - w)
                region = m[top : top + h, left : left + w]
                new = h * w - int(region.sum())
                if 0 < new <= budget:
                    region.fill_(True)
                    added = new
                    break
            if added == 0:
                free = (~m).flatten().nonzero().flatten().tolist()
                m.view(-1)[torch.tensor(rng.sample(free, budget), dtype=torch.long)] = True
                added = budget
            count += added
    return masks.flatten(1)


def grid_mask(batch_size: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """Keep the top-left patch of every 2x2 cell visible (ratio 0.75 on even grids), as in MAE's ablation."""
    rows, cols = grid_size
    mask = torch.ones(rows, cols, dtype=torch.bool)
    mask[::2, ::2] = False
    return mask.flatten().expand(batch_size, -1).clone()


def upsample_mask(mask: torch.Tensor, grid_size: tuple[int, int], factor: int) -> torch.Tensor:
    """Nearest-neighbour upsampling of a [B, h*w] mask to the [B, (h*f)*(w*f)] grid `factor` times finer."""
    rows, cols = grid_size
    m = mask.reshape(-1, rows, cols)
    m = m.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)
    return m.flatten(1)


class MaskGenerator:
    """A picklable, seeded mask factory for one patch grid; `gen(batch_size, generator)` -> [B, L] bool.

    kind: "random" (MAE), "block" (BEiT/CAE) or "grid".
    """

    kinds = ("random", "block", "grid")

    def __init__(self, kind: str, grid_size, mask_ratio: float, min_block: int = 16, min_aspect: float = 0.3):
        if kind not in self.kinds:
            raise ValueError(f"unknown mask kind {kind!r}; choose one of {self.kinds}")
        self.kind = kind
        self.grid_size = to_2tuple(grid_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.mask_ratio = mask_ratio
        self.min_block = min_block
        self.min_aspect = min_aspect

    @property
    def num_masked(self) -> int:
        if self.kind == "grid":
            return int(grid_mask(1, self.grid_size).sum())
        if self.kind == "block":
            return int(round(self.num_patches * self.mask_ratio))
        return self.num_patches - int(self.num_patches * (1 - self.mask_ratio))

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.kind == "random":
            return random_mask(batch_size, self.num_patches, self.mask_ratio, generator)
        if self.kind == "block":
            return block_mask(
                batch_size, self.grid_size, self.num_masked, self.min_block, self.min_aspect, generator
            )
        return grid_mask(batch_size, self.grid_size)

    def __repr__(self) -> str:
        return f"MaskGenerator({self.kind!r}, grid={self.grid_size}, masked={self.num_masked}/{self.num_patches})"
