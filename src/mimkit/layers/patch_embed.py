"""Image to patch tokens: a Conv2d with kernel = stride = patch size."""

from __future__ import annotations

import torch
from torch import nn


def to_2tuple(x: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    return (int(x[0]), int(x[1]))


class PatchEmbed(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        for side, p in zip(self.img_size, self.patch_size):
            if side % p:
                raise ValueError(
                    f"image size {self.img_size} is not divisible by patch size {self.patch_size}; "
                    "choose an img_size that is a multiple of the patch size"
                )
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # [B, C, H, W] -> [B, L, D]
        if tuple(images.shape[-2:]) != self.img_size:
            raise ValueError(
                f"expected images of size {self.img_size}, got {tuple(images.shape[-2:])}; "
                "resize the data or build the model with a matching img_size"
            )
        return self.proj(images).flatten(2).transpose(1, 2)

    def init_weights(self) -> None:
        # As a Linear over the flattened kernel (MAE): xavier-uniform on [D, C*p*p].
        w = self.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.proj.bias is not None:  # always (bias=True); for the type checker
            nn.init.zeros_(self.proj.bias)
