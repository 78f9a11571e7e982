"""Fixed 2D sin-cos position embeddings (MAE layout: column encoding first, row encoding second)."""

from __future__ import annotations

import torch


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[N] positions -> [N, embed_dim] as [sin(pos * omega), cos(pos * omega)], computed in float64."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # [D/2]
    angles = positions.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)  # [N, D/2]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(embed_dim: int, grid_size: tuple[int, int], cls_token: bool = False) -> torch.Tensor:
    """Position embedding for a (rows, cols) patch grid in row-major order -> [(1 +) rows*cols, D] float32.

    The first D/2 channels encode the column (w) index, the last D/2 the row (h) index, as in the released
    MAE checkpoints, so their frozen embeddings are reproduced bit for bit. The class-token row is zeros.
    """
    if embed_dim % 4:
        raise ValueError(f"2D sin-cos embedding needs a width divisible by 4, got {embed_dim}")
    rows, cols = grid_size
    row_idx, col_idx = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    emb = torch.cat(
        [sincos_1d(embed_dim // 2, col_idx.flatten()), sincos_1d(embed_dim // 2, row_idx.flatten())], dim=1
    )  # [rows*cols, D]
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()
