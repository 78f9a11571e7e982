"""MAE (He et al., 2021): an encoder on visible patches, a light decoder that predicts the masked pixels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..backbones.vit import VisionTransformer, scatter_visible
from ..layers.patch_embed import to_2tuple
from ..masking import MaskGenerator
from ..registry import register_model
from ..targets import masked_mse, pixel_target
from .base import LossTerms, MAEDecoderFields, MIMOutput, add_mae_decoder, run_mae_decoder_blocks


@dataclass(frozen=True)
class MAEConfig:
    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mask_ratio: float = 0.75
    mask_kind: str = "random"  # random | grid | block
    norm_pix_loss: bool = True
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-6


class MAE(MAEDecoderFields):
    method = "mae"

    def __init__(self, config: MAEConfig):
        super().__init__()
        self.config = c = config
        self.encoder = VisionTransformer(
            c.img_size, c.patch_size, c.in_chans, c.embed_dim, c.depth, c.num_heads, c.mlp_ratio,
            drop_path_rate=c.drop_path_rate, norm_eps=c.norm_eps,
        )  # fmt: skip
        self.patch_size = c.patch_size
        self.grid_size = self.encoder.grid_size
        self.mask_generator = MaskGenerator(c.mask_kind, self.grid_size, c.mask_ratio)

        patch_area = self.encoder.patch_embed.patch_size[0] * self.encoder.patch_embed.patch_size[1]
        add_mae_decoder(self, c.embed_dim, c, patch_area * c.in_chans, self.grid_size, cls_token=True)

    def forward_encoder(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W], [B, L] -> latent [B, 1 + keep, D] (class token first, visible tokens in grid order)."""
        return self.encoder.forward_features(images, mask)

    def forward_decoder(self, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """latent [B, 1 + keep, D] -> pixel predictions [B, L, p*p*C] for every patch."""
        x = self.decoder_embed(latent)  # [B, 1 + keep, Dd]
        patches = scatter_visible(x[:, 1:], mask, self.mask_token.flatten())  # [B, L, Dd]
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed.to(x.dtype)  # [B, 1 + L, Dd]
        return run_mae_decoder_blocks(self, x)[:, 1:]  # drop the class token's output

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> LossTerms:
        target = pixel_target(images, self.patch_size, self.config.norm_pix_loss)  # [B, L, p*p*C]
        return LossTerms(masked_mse(pred, target, mask))

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> MIMOutput:
        if mask is None:
            mask = self.mask_generator(images.shape[0])
        mask = mask.to(images.device)
        latent = self.forward_encoder(images, mask)  # [B, 1 + keep, D]
        pred = self.forward_decoder(latent, mask)  # [B, L, p*p*C]
        loss, metrics = self.forward_loss(images, pred, mask)
        return MIMOutput(loss=loss, pred=pred, mask=mask, metrics=metrics, features=latent[:, 0])

    def flops_per_image(self, training: bool = True) -> int:
        """Matmul FLOPs per image of a training step (or a forward), counted exactly from the config."""
        return mae_flops_per_image(self.config, training)


def _transformer_fwd_flops(tokens: int, dim: int, depth: int, mlp_ratio: float) -> int:
    """Forward matmul FLOPs of `depth` pre-norm blocks on `tokens` tokens of width `dim` (one image)."""
    hidden = int(dim * mlp_ratio)
    linear = 2 * tokens * dim * (3 * dim + dim + 2 * hidden)  # qkv, proj, fc1, fc2
    attention = 2 * 2 * tokens * tokens * dim  # q k^T and (scores) v, summed over heads
    return depth * (linear + attention)


def mae_flops_per_image(config: Any, training: bool = True) -> int:
    """Matmul FLOPs of one MAE image: encoder on the class token + visible patches, decoder on all tokens.

    `config` is an `MAEConfig` (or anything with its fields). `training=True` counts forward + backward
    (3x forward, except the patch embedding's backward, which computes only the weight gradient); matmuls
    only, 2 FLOPs per multiply-add (the convention of `engine.perf`, which checks it against FlopCounterMode).
    """
    (h, w), (ph, pw) = to_2tuple(config.img_size), to_2tuple(config.patch_size)
    num_patches = (h // ph) * (w // pw)
    keep = int(num_patches * (1 - config.mask_ratio))
    if config.mask_kind == "grid":
        keep = ((h // ph + 1) // 2) * ((w // pw + 1) // 2)
    patch_dim = ph * pw * config.in_chans
    D, Dd = config.embed_dim, config.decoder_embed_dim

    patch_embed = 2 * num_patches * patch_dim * D  # the conv runs on every patch, before masking
    rest = (
        _transformer_fwd_flops(1 + keep, D, config.depth, config.mlp_ratio)
        + 2 * (1 + keep) * D * Dd  # decoder_embed
        + _transformer_fwd_flops(1 + num_patches, Dd, config.decoder_depth, config.mlp_ratio)
        + 2 * (1 + num_patches) * Dd * patch_dim  # decoder_pred (class token included, then dropped)
    )
    if not training:
        return patch_embed + rest
    return 2 * patch_embed + 3 * rest


def _preset(**kw) -> MAEConfig:
    return MAEConfig(**kw)


register_model(
    "mae_vit_tiny_patch4_32",
    MAE,
    _preset(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3,
            decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
)  # fmt: skip
register_model("mae_vit_small_patch16_224", MAE, _preset(embed_dim=384, depth=12, num_heads=6))
register_model("mae_vit_base_patch16_224", MAE, _preset(embed_dim=768, depth=12, num_heads=12))
register_model("mae_vit_large_patch16_224", MAE, _preset(embed_dim=1024, depth=24, num_heads=16))
register_model(
    "mae_vit_huge_patch14_224", MAE, _preset(patch_size=14, embed_dim=1280, depth=32, num_heads=16)
)
