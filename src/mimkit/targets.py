"""Patchify, pixel targets and masked losses shared by the methods."""

from __future__ import annotations

import torch

from .layers.patch_embed import to_2tuple


def patchify(images: torch.Tensor, patch_size) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, p*p*C]; pixel order within a patch is row, column, channel (channel last)."""
    ph, pw = to_2tuple(patch_size)
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // ph, ph, W // pw, pw)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // ph) * (W // pw), ph * pw * C)


def unpatchify(patches: torch.Tensor, patch_size, grid_size, channels: int) -> torch.Tensor:
    """[B, L, p*p*C] -> [B, C, H, W]; exact inverse of `patchify`."""
    ph, pw = to_2tuple(patch_size)
    rows, cols = to_2tuple(grid_size)
    B = patches.shape[0]
    x = patches.reshape(B, rows, cols, ph, pw, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, rows * ph, cols * pw)


def patch_stats(patches: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and std (unbiased variance + eps), each [B, L, 1]."""
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True) + eps).sqrt()
    return mean, std


def pixel_target(images: torch.Tensor, patch_size, norm_pix: bool) -> torch.Tensor:
    """MAE's regression target [B, L, p*p*C]: raw patches, or each patch normalised by its own statistics."""
    target = patchify(images, patch_size)
    if norm_pix:
        mean, std = patch_stats(target)
        target = (target - mean) / std
    return target


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked patches of the per-patch mean squared error. pred/target [B, L, K], mask [B, L]."""
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # [B, L]
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum()
