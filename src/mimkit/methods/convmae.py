"""ConvMAE (Gao et al., 2022): MAE with a hybrid conv-transformer encoder, masked convolution, multi-scale fusion.

Encoder: `mimkit.backbones.convvit.ConvViT` (see its module doc). Mask: random 75% on the stage-3 grid
(total stride `patch_size`, 16 for the paper's strides 4/2/2), upsampled to stages 1-2 inside the encoder.
Decoder and loss: MAE's (Linear to 512, one shared mask token per masked patch, fixed sin-cos pos embed,
8 blocks of 16 heads, LayerNorm, Linear to p*p*C; norm-pix MSE on masked patches), without a class token,
with MAE's state-dict key names (decoder_embed, mask_token, decoder_pos_embed, decoder_blocks, decoder_norm,
decoder_pred).

Presets (widths / depths of the three stages, ViT heads; total stride = patch size):

- convmae_tiny_patch8_64: CPU preset for Fashion-MNIST-sized data: 64 px, strides 2/2/2 (stage grids
  32/16/8), widths 64/96/192, depths 1/1/4, 3 heads, decoder 128 wide x 2 blocks. An 8x8 stage-3 grid keeps
  16 visible tokens at 75% masking, as the MAE tiny preset (32 px / patch 4); the Base strides on a 64 px
  image would leave a 4x4 grid and 4 visible tokens.
- convmae_small_patch16_224: 128/256/384, depths 2/2/11, 6 heads (ViT-S width for stage 3, Base layout).
- convmae_base_patch16_224: 256/384/768, depths 2/2/11, 12 heads (the paper's ConvMAE-B).
- convmae_large_patch16_224: 384/768/1024, depths 2/2/23, 16 heads (ViT-L width and depth for stage 3,
  wider conv stages in proportion; not a released model).

Any image size divisible by the total stride works at run time (square or not); `img_size` only sets the
stored position embeddings and the default mask generator's grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..backbones.convvit import ConvViT
from ..backbones.vit import scatter_visible
from ..layers import sincos_2d
from ..masking import MaskGenerator
from ..registry import register_model
from ..targets import masked_mse, pixel_target
from .base import LossTerms, MAEDecoderFields, MIMOutput, add_mae_decoder, run_mae_decoder_blocks


@dataclass(frozen=True)
class ConvMAEConfig:
    img_size: int | tuple[int, int] = 224
    in_chans: int = 3
    strides: tuple[int, int, int] = (4, 2, 2)  # patch-embedding strides of stages 1, 2, 3
    embed_dims: tuple[int, int, int] = (256, 384, 768)
    depths: tuple[int, int, int] = (2, 2, 11)
    num_heads: int = 12  # stage-3 ViT blocks
    mlp_ratio: float = 4.0
    dw_kernel: int = 5  # depthwise conv of the conv blocks
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mask_ratio: float = 0.75
    mask_kind: str = "random"  # random | grid | block, on the stage-3 grid
    norm_pix_loss: bool = True
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-6  # ViT blocks and final norms
    conv_norm_eps: float = 1e-5  # patch embeddings and conv blocks (nn.LayerNorm default, as the authors)
    skip_masked: bool = True  # stages 1-2 on visible cells only (exact; faster)
    masked_conv: bool = True  # False: the leaky variant (depthwise convs see masked pixels), for the ablation
    multiscale_fusion: bool = True  # False: no stage-1/2 fusion into the encoder output, for the ablation

    @property
    def patch_size(self) -> int:
        """Total stride: the side of one stage-3 patch in pixels (the reconstruction target's patch)."""
        return math.prod(self.strides)

    @property
    def embed_dim(self) -> int:
        return self.embed_dims[-1]


class ConvMAE(MAEDecoderFields):
    method = "convmae"

    def __init__(self, config: ConvMAEConfig):
        super().__init__()
        self.config = c = config
        self.encoder = ConvViT(
            c.img_size, c.in_chans, c.embed_dims, c.depths, c.strides, c.num_heads, c.mlp_ratio, c.dw_kernel,
            c.drop_path_rate, c.norm_eps, c.conv_norm_eps, c.skip_masked, c.masked_conv, c.multiscale_fusion,
        )  # fmt: skip
        self.patch_size = self.encoder.patch_size
        self.grid_size = self.encoder.grid_size
        self.mask_generator = MaskGenerator(c.mask_kind, self.grid_size, c.mask_ratio)

        add_mae_decoder(
            self, c.embed_dims[-1], c, self.patch_size**2 * c.in_chans, self.grid_size, cls_token=False
        )

    def mask_generator_for(self, grid_size: tuple[int, int]) -> MaskGenerator:
        """The configured mask generator, or one of the same kind and ratio for another stage-3 grid."""
        if tuple(grid_size) == self.grid_size:
            return self.mask_generator
        return MaskGenerator(self.config.mask_kind, grid_size, self.config.mask_ratio)

    def forward_encoder(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W], [B, L] -> latent [B, keep, D] (visible tokens in grid order, no class token)."""
        return self.encoder.forward_features(images, mask)

    def forward_decoder(
        self, latent: torch.Tensor, mask: torch.Tensor, grid_size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """latent [B, keep, D] -> pixel predictions [B, L, p*p*C] for every patch of the stage-3 grid."""
        grid = grid_size or self.grid_size
        pos: torch.Tensor = self.decoder_pos_embed
        if tuple(grid) != tuple(self.grid_size):
            pos = sincos_2d(self.config.decoder_embed_dim, (grid[0], grid[1])).unsqueeze(0).to(latent.device)
        x = self.decoder_embed(latent)  # [B, keep, Dd]
        x = scatter_visible(x, mask, self.mask_token.flatten()) + pos.to(x.dtype)  # [B, L, Dd]
        return run_mae_decoder_blocks(self, x)

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> LossTerms:
        target = pixel_target(images, self.patch_size, self.config.norm_pix_loss)  # [B, L, p*p*C]
        return LossTerms(masked_mse(pred, target, mask))

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> MIMOutput:
        grid = self.encoder.grid_for(images)
        if mask is None:
            mask = self.mask_generator_for(grid)(images.shape[0])
        mask = mask.to(images.device)
        latent = self.forward_encoder(images, mask)  # [B, keep, D]
        pred = self.forward_decoder(latent, mask, grid)  # [B, L, p*p*C]
        loss, metrics = self.forward_loss(images, pred, mask)
        return MIMOutput(loss=loss, pred=pred, mask=mask, metrics=metrics, features=latent.mean(dim=1))


def _preset(**kw) -> ConvMAEConfig:
    return ConvMAEConfig(**kw)


register_model(
    "convmae_tiny_patch8_64",
    ConvMAE,
    _preset(img_size=64, strides=(2, 2, 2), embed_dims=(64, 96, 192), depths=(1, 1, 4), num_heads=3,
            decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
)  # fmt: skip
register_model(
    "convmae_small_patch16_224", ConvMAE, _preset(embed_dims=(128, 256, 384), depths=(2, 2, 11), num_heads=6)
)
register_model(
    "convmae_base_patch16_224", ConvMAE, _preset(embed_dims=(256, 384, 768), depths=(2, 2, 11), num_heads=12)
)
register_model(
    "convmae_large_patch16_224",
    ConvMAE,
    _preset(embed_dims=(384, 768, 1024), depths=(2, 2, 23), num_heads=16),
)
