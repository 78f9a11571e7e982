from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .attention import Attention
from .drop_path import DropPath
from .mlp import LayerScale, Mlp


class Block(nn.Module):
    """Pre-norm transformer block (timm names: norm1, attn, ls1, norm2, mlp, ls2):

        x = x + drop_path(ls1(attn(norm1(x))))
        x = x + drop_path(ls2(mlp(norm2(x))))

    `selective_checkpointing` (see `set_selective_checkpointing`) trades compute for memory in training.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool | str = True,
        drop_path: float = 0.0,
        layer_scale_init: float | None = None,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.ls1 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.selective_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, D] -> [B, N, D]."""
        if self.selective_checkpointing and torch.is_grad_enabled():
            return checkpoint(
                self.residuals, x, use_reentrant=False, context_fn=_keep_matmul_outputs, **_SAC_HOOKS
            )
        return self.residuals(x)

    def residuals(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


# Outputs kept for backward under selective checkpointing; everything else in the block (layer norms, GELU,
# softmax, casts, adds) is recomputed from them and the block's input.
_MATMULS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _MATMULS else CheckpointPolicy.PREFER_RECOMPUTE


_keep_matmul_outputs = functools.partial(create_selective_checkpoint_contexts, _policy)
# What the checkpoint keeps goes through saved-tensor hooks (save_on_cpu, memory accounting) where torch
# offers the choice; older releases bypass them.
_SAC_HOOKS: dict[str, Any] = (
    {"respect_saved_tensors_hooks": True}
    if "respect_saved_tensors_hooks" in inspect.signature(checkpoint).parameters
    else {}
)


def set_selective_checkpointing(module: nn.Module, enabled: bool = True) -> nn.Module:
    """In every `Block` of `module`, keep only the matmul and attention outputs for backward and recompute the
    cheap ops (torch's selective activation checkpointing): fewer stored activations for some extra
    compute (measured in `benchmarks/recompute_cost.py`). Same results; stochastic depth is replayed."""
    for m in module.modules():
        if isinstance(m, Block):
            m.selective_checkpointing = enabled
    return module


def compile_blocks(module: nn.Module, **compile_kwargs) -> nn.Module:
    """Regional compilation: `torch.compile` every transformer `Block` and CAE `CrossAttentionBlock` of `module`
    in place (`nn.Module.compile`; parameters and state-dict keys unchanged), not the whole model.

    Blocks of one width and token count share one compiled graph, so the compile time is that of a few
    blocks rather than the whole model, and the code between blocks (masking, gathers, losses) stays eager.
    Inductor fuses each block's layer norms, GELU, softmax, casts and residual adds into a few kernels; the
    matmuls stay oneDNN/cuBLAS calls. Measured in docs/performance.md; numerics as eager up to rounding.
    With drop path, the compiled blocks draw their own random numbers (reproducible, but not eager's).
    """
    from .cross_attention import CrossAttentionBlock

    for m in module.modules():
        if isinstance(m, (Block, CrossAttentionBlock)):
            m.compile(**compile_kwargs)
    return module
