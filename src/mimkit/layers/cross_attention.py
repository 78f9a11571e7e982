"""Cross-attention (queries attend to a separate key/value set) and CAE's regressor block."""

from __future__ import annotations

import torch
from torch import nn

from .attention import attend, check_heads_and_bias
from .drop_path import DropPath
from .mlp import LayerScale, Mlp


class CrossAttention(nn.Module):
    """Multi-head attention of queries [B, Nq, D] over keys [B, Nk, D] and values [B, Nk, D].

    Separate q/k/v projections (the inputs differ). qkv_bias: True, False, or "qv" (q and v biases, no k
    bias, as BEiT/CAE).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool | str = "qv"):
        super().__init__()
        check_heads_and_bias(dim, num_heads, qkv_bias)
        self.num_heads = num_heads
        self.fused = True
        self.q = nn.Linear(dim, dim, bias=bool(qkv_bias))
        self.k = nn.Linear(dim, dim, bias=qkv_bias is True)
        self.v = nn.Linear(dim, dim, bias=bool(qkv_bias))
        self.proj = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        return x.reshape(B, N, self.num_heads, D // self.num_heads).transpose(1, 2)  # [B, h, N, d]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, Nq, D = q.shape
        x = attend(self._heads(self.q(q)), self._heads(self.k(k)), self._heads(self.v(v)), self.fused)
        return self.proj(x.transpose(1, 2).reshape(B, Nq, D))  # [B, Nq, D]


class CrossAttentionBlock(nn.Module):
    """CAE's latent contextual regressor block (SPEC §4). Only the queries are updated:

        q = LN_q(x_q + pos_q); k = LN_k(x_kv + pos_kv); v = LN_v(x_kv)
        x_q = x_q + ls1 * CrossAttn(q, k, v); x_q = LN_2(x_q); x_q = x_q + ls2 * MLP(x_q)

    where the caller passes x_kv = cat(visible latents, x_q) and pos_kv = cat(pos_visible, pos_q).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool | str = "qv",
        drop_path: float = 0.0,
        layer_scale_init: float | None = None,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim, eps=norm_eps)
        self.norm_k = nn.LayerNorm(dim, eps=norm_eps)
        self.norm_v = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = CrossAttention(dim, num_heads, qkv_bias)
        self.ls1 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self, x_q: torch.Tensor, x_kv: torch.Tensor, pos_q: torch.Tensor, pos_kv: torch.Tensor
    ) -> torch.Tensor:
        """x_q, pos_q [B, Nq, D]; x_kv, pos_kv [B, Nk, D] -> updated queries [B, Nq, D]."""
        attn = self.attn(self.norm_q(x_q + pos_q), self.norm_k(x_kv + pos_kv), self.norm_v(x_kv))
        x = self.norm2(x_q + self.drop_path(self.ls1(attn)))
        return x + self.drop_path(self.ls2(self.mlp(x)))
