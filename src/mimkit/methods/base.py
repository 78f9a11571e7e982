"""What every method returns, so the trainer, visualizer and probes treat MAE, CAE and ConvMAE alike."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from ..backbones.vit import init_linear_and_norm
from ..layers import Block, sincos_2d


@dataclass
class MIMOutput:
    """loss: scalar to minimise; pred: [B, L, K] predictions for every patch (K = p*p*C for pixels, or the
    codebook size for token targets); mask: [B, L] bool, True = masked; metrics: detached scalars to log."""

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    features: torch.Tensor | None = None


class LossTerms(NamedTuple):
    """What every method's `forward_loss` returns: the scalar to minimise and detached scalars to log."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = {}  # a NamedTuple default: shared, never mutated


class MAEDecoderFields(nn.Module):
    """A module with MAE's decoder, as `add_mae_decoder` builds it (MAE and ConvMAE derive from this)."""

    decoder_embed: nn.Linear
    mask_token: nn.Parameter
    decoder_pos_embed: nn.Parameter
    decoder_blocks: nn.ModuleList
    decoder_norm: nn.LayerNorm
    decoder_pred: nn.Linear


def add_mae_decoder(
    model: MAEDecoderFields,
    in_dim: int,
    config: Any,
    out_dim: int,
    grid_size: tuple[int, int],
    cls_token: bool,
) -> None:
    """Give `model` MAE's decoder under MAE's key names (shared by MAE and ConvMAE, whose authors use it):

    decoder_embed (Linear in_dim -> Dd), mask_token [1, 1, Dd], decoder_pos_embed [1, (1 +) L, Dd] (fixed
    sin-cos, a class-token row with `cls_token`), decoder_blocks (Dd wide, `config.decoder_num_heads`),
    decoder_norm, decoder_pred (Linear Dd -> out_dim); MAE's init (xavier, mask token N(0, 0.02)).
    `config` supplies decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio and norm_eps.
    """
    dim = config.decoder_embed_dim
    model.decoder_embed = nn.Linear(in_dim, dim)
    model.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
    pos = sincos_2d(dim, grid_size, cls_token=cls_token).unsqueeze(0)
    model.decoder_pos_embed = nn.Parameter(pos, requires_grad=False)
    model.decoder_blocks = nn.ModuleList(
        Block(dim, config.decoder_num_heads, config.mlp_ratio, norm_eps=config.norm_eps)
        for _ in range(config.decoder_depth)
    )
    model.decoder_norm = nn.LayerNorm(dim, eps=config.norm_eps)
    model.decoder_pred = nn.Linear(dim, out_dim)
    nn.init.normal_(model.mask_token, std=0.02)
    for module in (model.decoder_embed, model.decoder_blocks, model.decoder_norm, model.decoder_pred):
        init_linear_and_norm(module)


def run_mae_decoder_blocks(model: MAEDecoderFields, tokens: torch.Tensor) -> torch.Tensor:
    """[B, N, Dd] decoder tokens (position embedding added) -> [B, N, out_dim] through blocks, norm, head."""
    for block in model.decoder_blocks:
        tokens = block(tokens)
    return model.decoder_pred(model.decoder_norm(tokens))
