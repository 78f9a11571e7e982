"""Multi-head self-attention with fused SDPA and an exact math path kept for tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attention_probabilities(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) for [B, heads, Nq, d], [B, heads, Nk, d] -> [B, heads, Nq, Nk]."""
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for [B, heads, N, d] tensors; `fused=False` is the plain-math reference.

    `fused=True` picks the fastest kernel: `F.scaled_dot_product_attention`, except for bf16/fp16 on CPU,
    where its flash kernel (forward + backward) measured 2.5-6x slower than two batched matmuls and a
    softmax at ViT shapes (N <= 197, d = 32-64); there the batched-matmul form runs (same math).
    """
    if not fused or (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)):
        return attention_probabilities(q, k) @ v
    return F.scaled_dot_product_attention(q, k, v)


def check_heads_and_bias(dim: int, num_heads: int, qkv_bias: bool | str) -> None:
    if dim % num_heads:
        raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
    if qkv_bias not in (True, False, "qv"):
        raise ValueError(f"qkv_bias must be True, False or 'qv', got {qkv_bias!r}")


class Attention(nn.Module):
    """Self-attention over [B, N, D] with one fused qkv projection (timm names: `qkv`, `proj`).

    qkv_bias: True (one bias for q, k and v, as ViT/MAE), False, or "qv" (learned q and v biases and no
    k bias, as BEiT/CAE; stored as `q_bias`/`v_bias`).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool | str = True):
        super().__init__()
        check_heads_and_bias(dim, num_heads, qkv_bias)
        self.num_heads = num_heads
        self.fused = True
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias is True)
        self.q_bias: nn.Parameter | None
        self.v_bias: nn.Parameter | None
        if qkv_bias == "qv":
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, D] -> [B, N, D]."""
        B, N, D = x.shape
        bias: torch.Tensor | None = self.qkv.bias
        if self.q_bias is not None and self.v_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias)  # [B, N, 3D]
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(
            2, 0, 3, 1, 4
        )  # [B, h, N, d]
        x = attend(q, k, v, self.fused)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


def set_fused_attention(module: nn.Module, enabled: bool) -> nn.Module:
    """Switch every attention layer in `module` between fused SDPA and the exact math path."""
    for m in module.modules():
        if hasattr(m, "fused"):
            setattr(m, "fused", enabled)  # noqa: B010  a plain attribute (nn.Module's __setattr__ is typed for tensors)
    return module
