"""Autograd functions that recompute cheap activations in backward instead of storing them.

Each one is the plain composition of torch ops in forward and returns the gradients autograd would
compute through those ops (tests/test_perf.py checks both, and what is saved); only what is kept between
forward and backward changes. Together they cut a ViT-B MAE training step's stored activations by ~40%
(docs/performance.md) for < 2% more compute:

- `norm_linear`: linear(layer_norm(x)) keeps x (which the residual stream keeps anyway), not the
  normalised copy: one [B, N, D] activation less per qkv and per fc1.
- `gelu_linear`: linear(gelu(h)) keeps h (GELU's own input), not gelu(h): one [B, N, 4D] less per MLP.
- `softmax_attention`: softmax(q k^T / sqrt(d)) v keeps q, k, v, not the [B, h, N, N] probabilities
  (the largest activation of MAE's decoder in bf16, where this batched-matmul form replaces SDPA on CPU).

Under autocast the linear layers run in the autocast dtype with their weights cast once per call, as
autocast would run them; layer norm and the residual stream stay in the input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _weight_grads(ctx, grad_out: torch.Tensor, inp: torch.Tensor, weight_index: int):
    """dL/dW [out, in] and dL/db [out] of F.linear(inp, W, b) from grad_out [..., out] and inp [..., in],
    for W, b at positions weight_index, weight_index + 1 of the function's inputs (None where not needed)."""
    need_w, need_b = ctx.needs_input_grad[weight_index : weight_index + 2]
    g = grad_out.reshape(-1, grad_out.shape[-1])
    grad_w = g.t() @ inp.reshape(-1, inp.shape[-1]) if need_w else None
    return grad_w, (g.sum(0) if need_b else None)


class _NormLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, weight, bias):  # x [..., D], weight [out, D]
        y, mean, rstd = torch.native_layer_norm(x, x.shape[-1:], norm_weight, norm_bias, eps)
        ctx.save_for_backward(x, mean, rstd, norm_weight, norm_bias, weight)
        ctx.eps = eps
        return F.linear(y.to(weight.dtype), weight, bias)  # [..., out]

    @staticmethod
    def backward(ctx, grad_out):
        x, mean, rstd, norm_weight, norm_bias, weight = ctx.saved_tensors
        y = torch.native_layer_norm(x, x.shape[-1:], norm_weight, norm_bias, ctx.eps)[0]
        grad_w, grad_b = _weight_grads(ctx, grad_out, y.to(weight.dtype), 4)
        grad_y = (grad_out @ weight).to(x.dtype)  # [..., D]
        grad_x, grad_nw, grad_nb = torch.ops.aten.native_layer_norm_backward(
            grad_y, x, x.shape[-1:], mean, rstd, norm_weight, norm_bias, list(ctx.needs_input_grad[:3])
        )
        return grad_x, grad_nw, grad_nb, None, grad_w, grad_b


class _GeluLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias):  # h [..., hidden], weight [out, hidden]
        ctx.save_for_backward(h, weight)
        return F.linear(F.gelu(h).to(weight.dtype), weight, bias)  # [..., out]

    @staticmethod
    def backward(ctx, grad_out):
        h, weight = ctx.saved_tensors
        grad_w, grad_b = _weight_grads(ctx, grad_out, F.gelu(h).to(weight.dtype), 1)
        return torch.ops.aten.gelu_backward((grad_out @ weight).to(h.dtype), h), grad_w, grad_b


class _SoftmaxAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):  # [B, h, Nq, d], [B, h, Nk, d], [B, h, Nk, d]
        ctx.save_for_backward(q, k, v)
        return attention_probabilities(q, k) @ v  # [B, h, Nq, d]

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        scale = q.shape[-1] ** -0.5
        probs = attention_probabilities(q, k)  # [B, h, Nq, Nk], bit-identical to the forward's
        grad_v = probs.transpose(-2, -1) @ grad_out
        grad_scores = torch._softmax_backward_data(grad_out @ v.transpose(-2, -1), probs, -1, probs.dtype)
        return (grad_scores @ k) * scale, grad_scores.transpose(-2, -1) @ (q * scale), grad_v


def attention_probabilities(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, h, Nq, Nk]


def norm_linear(
    x: torch.Tensor, norm: nn.LayerNorm, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """F.linear(norm(x), weight, bias), storing x rather than norm(x) for backward. x [..., D]."""
    dtype = _compute_dtype(x)
    if torch.is_autocast_enabled(x.device.type):
        x = x.float()  # autocast runs layer norm in fp32
    with torch.autocast(x.device.type, enabled=False):
        return _NormLinear.apply(x, norm.weight, norm.bias, norm.eps, weight.to(dtype), _cast(bias, dtype))


def gelu_linear(h: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """linear(gelu(h)), storing h rather than gelu(h) for backward. h [..., hidden]."""
    dtype = _compute_dtype(h)
    with torch.autocast(h.device.type, enabled=False):
        return _GeluLinear.apply(h, linear.weight.to(dtype), _cast(linear.bias, dtype))


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with batched matmuls, storing q, k, v rather than the probabilities."""
    return _SoftmaxAttention.apply(q, k, v)
