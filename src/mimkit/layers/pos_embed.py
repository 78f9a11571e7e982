"""Fixed 2D sin-cos position embeddings in the two layouts the authors' codes use.

"mae": the first D/2 channels encode the column index, the last D/2 the row index, each as [sin, cos]
(MAE, ConvMAE). "cae": the row index first, then the column index (CAE, after MoCo v3); same frequencies.
"""

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


def sincos_2d(
    embed_dim: int, grid_size: tuple[int, int], cls_token: bool = False, layout: str = "mae"
) -> torch.Tensor:
    """Position embedding for a (rows, cols) patch grid in row-major order -> [(1 +) rows*cols, D] float32.

    layout "mae" reproduces the released MAE checkpoints' frozen embeddings bit for bit, "cae" the CAE
    authors' table (to float32 rounding). The class-token row is zeros in both.
    """
    if embed_dim % 4:
        raise ValueError(f"2D sin-cos embedding needs a width divisible by 4, got {embed_dim}")
    if layout not in ("mae", "cae"):
        raise ValueError(f"sin-cos layout must be 'mae' or 'cae', got {layout!r}")
    rows, cols = grid_size
    row_idx, col_idx = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    row_idx, col_idx = row_idx.flatten(), col_idx.flatten()
    first, second = (col_idx, row_idx) if layout == "mae" else (row_idx, col_idx)
    emb = torch.cat([sincos_1d(embed_dim // 2, first), sincos_1d(embed_dim // 2, second)], dim=1)  # [L, D]
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()
