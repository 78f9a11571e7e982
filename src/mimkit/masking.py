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


def python_block_mask(
    rng: random.Random,
    grid_size: tuple[int, int],
    num_masked: int,
    min_block: int = 16,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
) -> torch.Tensor:
    """One BEiT/CAE block-wise mask [rows, cols] (True = masked) with exactly `num_masked` patches.

    The authors' procedure, call for call on `rng`: while patches remain to be masked, up to 10 tries to
    draw a rectangle of area U(min_block, remaining) (for remaining < min_block that is a draw from
    [remaining, min_block]) and aspect ratio log-uniform in [min_aspect, max_aspect (default 1/min_aspect)],
    placed uniformly; the first that adds between 1 and `remaining` new patches is masked. Rounds repeat
    until the count is reached, so the blocks keep the authors' shapes (seeded with `random.Random(s)`, it
    gives their masks for `random.seed(s)`). Only a grid where no rectangle can ever fit (e.g. 1 x 1) falls
    back to scattering the rest, after 1,000 empty rounds.
    """
    rows, cols = grid_size
    if not 0 <= num_masked <= rows * cols:
        raise ValueError(f"cannot mask {num_masked} of {rows * cols} patches")
    log_aspect = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))
    mask = [[False] * cols for _ in range(rows)]
    count, empty_rounds = 0, 0
    while count < num_masked and empty_rounds < 1000:
        remaining = num_masked - count
        added = 0
        for _attempt in range(10):
            area = rng.uniform(min_block, remaining)
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < cols and h < rows:
                top, left = rng.randint(0, rows - h), rng.randint(0, cols - w)
                cells = [(i, j) for i in range(top, top + h) for j in range(left, left + w) if not mask[i][j]]
                if 0 < len(cells) <= remaining:
                    for i, j in cells:
                        mask[i][j] = True
                    added = len(cells)
            if added:
                break
        count += added
        empty_rounds = 0 if added else empty_rounds + 1
    out = torch.tensor(mask, dtype=torch.bool)
    if count < num_masked:
        free = (~out).flatten().nonzero().flatten().tolist()
        out.view(-1)[torch.tensor(rng.sample(free, num_masked - count), dtype=torch.long)] = True
    return out


def block_mask(
    batch_size: int,
    grid_size: tuple[int, int],
    num_masked: int,
    min_block: int = 16,
    min_aspect: float = 0.3,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[B, rows*cols] block-wise masks (`python_block_mask`), exactly `num_masked` per image, seeded by
    `generator`."""
    rng = _python_rng(generator)
    masks = [python_block_mask(rng, grid_size, num_masked, min_block, min_aspect) for _ in range(batch_size)]
    return torch.stack(masks).flatten(1)


def block_mask_stats(
    grid_size: tuple[int, int],
    num_masked: int,
    min_block: int = 16,
    num_masks: int = 2000,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Shape statistics of `block_mask` over `num_masks` masks, as the authors' reference reports them:
    4-connected components per mask, isolated masked patches per mask, and the bounding-box area of the
    largest component (mean each), plus whether every mask had exactly `num_masked` patches."""
    masks = block_mask(num_masks, grid_size, num_masked, min_block, generator=generator)
    rows, cols = grid_size
    components = isolated = bbox = 0.0
    for flat in masks.tolist():
        cells = {(i // cols, i % cols) for i, m in enumerate(flat) if m}
        sizes_boxes = []
        while cells:
            stack, comp = [cells.pop()], []
            while stack:
                i, j = stack.pop()
                comp.append((i, j))
                for n in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
                    if n in cells:
                        cells.remove(n)
                        stack.append(n)
            rs, cs = [c[0] for c in comp], [c[1] for c in comp]
            sizes_boxes.append(
                (
                    len(comp),
                    -min(r * cols + c for r, c in comp),
                    (max(rs) - min(rs) + 1) * (max(cs) - min(cs) + 1),
                )
            )
        components += len(sizes_boxes)
        isolated += sum(size == 1 for size, _, _ in sizes_boxes)
        bbox += max(sizes_boxes)[2]  # the largest; ties: the first in raster order
    return {
        "components_per_mask": components / num_masks,
        "isolated_per_mask": isolated / num_masks,
        "largest_bbox_area": bbox / num_masks,
        "exact_count": bool((masks.sum(1) == num_masked).all()),
    }


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
