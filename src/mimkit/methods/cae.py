"""CAE (Chen et al., Context Autoencoder): encoder on visible patches, a latent contextual regressor that
predicts the masked patches' latents from the visible ones, alignment of those predictions with the
encoder's own latents of the masked patches, and a decoder that maps predicted latents to targets.

Forward pass (mask = True where hidden; V visible, M masked patches per image):

    z       = encoder(visible patches)                       [B, 1 + V, D]  (class token first)
    z_m     = regressor(mask tokens | z[:, 1:])              [B, M, D]      (cross-attention over the visible
                                                                            patch latents and the queries;
                                                                            no class token, z read only)
    target  = sg(encoder(masked patches))[:, 1:]             [B, M, D]      (live encoder at momentum 0)
    pred_m  = decoder(z_m + pos_m)                           [B, M, K]      (never sees z)
    loss    = decode_loss(pred_m) + align_weight * MSE(z_m, target)

As the authors compute it (checked against their code's outputs in tests/test_golden_parity.py): the regressor
and the decoder share one fixed sin-cos position table (`rd_pos_embed`, the authors' name and layout);
stochastic depth rises linearly to `drop_path_rate` in the encoder, the regressor and the decoder alike; the
patch embedding, class token and mask token start from a normal of std 0.02 truncated at +-0.02; the
alignment pass runs in the model's own mode (`teacher_mode="train"`: drop-path active, a stochastic target,
as the authors; "eval" makes it deterministic).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.vit import VisionTransformer, gather_visible, init_linear_and_norm, scatter_visible
from ..layers import Block, sincos_2d
from ..layers.cross_attention import CrossAttentionBlock
from ..masking import MaskGenerator
from ..protocols import Tokenizer
from ..registry import register_model
from ..targets import pixel_target
from .base import LossTerms, MIMOutput


@dataclass(frozen=True)
class CAEConfig:
    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    regressor_depth: int = 4
    decoder_depth: int = 4  # the regressor and the decoder run at the encoder's width, as CAE v1
    decoder_num_heads: int | None = None  # None = num_heads
    mask_ratio: float = 0.5
    mask_kind: str = "block"  # block | random | grid
    target: str = "pixel"  # pixel (MSE, norm-pix optional) | token (cross-entropy on tokenizer ids)
    norm_pix_loss: bool = True
    align_weight: float = 2.0  # 0: no alignment loss, and the alignment pass is skipped (ablation)
    # False (ablation, the paper's "w/o regressor"): no regressor and no alignment; the decoder reads the
    # visible latents with mask tokens in the masked positions, MAE-style. Needs align_weight=0.
    use_regressor: bool = True
    momentum: float = 0.0  # 0: the live encoder gives the alignment target; > 0: an EMA teacher
    layer_scale_init: float | None = 0.1  # encoder (CAE-L: 1e-5)
    decoder_layer_scale_init: float | None = 0.1  # regressor and decoder (0.1 at every size, as the authors)
    drop_path_rate: float = 0.0  # encoder, regressor and decoder, each rising linearly from 0
    teacher_mode: str = "train"  # alignment pass in the model's mode ("train", authors') or always "eval"
    tokenizer_path: str | None = None  # a `mimkit tokenizer train` file (or DALL-E encoder); target="token"
    # None = the tokenizer's codebook size; if set, must match it. Without a tokenizer (an imported token head),
    # forward needs `target_ids`.
    vocab_size: int | None = None
    norm_eps: float = 1e-6


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Temporarily switch off stochastic depth (and any dropout) in `module` for a deterministic target."""
    was_training = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in was_training:
            m.training = flag


def _drop_path_rates(rate: float, depth: int) -> list[float]:
    return torch.linspace(0, rate, depth).tolist()


def _init_token_like(tensor: torch.Tensor) -> None:
    """The authors' init for the patch embedding, class token and mask token: N(0, 0.02) cut at +-0.02."""
    nn.init.trunc_normal_(tensor, std=0.02, a=-0.02, b=0.02)


class CAE(nn.Module):
    method = "cae"

    def __init__(self, config: CAEConfig):
        super().__init__()
        self.config = c = config
        if c.target not in ("pixel", "token"):
            raise ValueError(f"CAE target must be 'pixel' or 'token', got {c.target!r}")
        if not 0.0 <= c.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {c.momentum}")
        if c.teacher_mode not in ("train", "eval"):
            raise ValueError(f"CAE teacher_mode must be 'train' or 'eval', got {c.teacher_mode!r}")
        if not c.use_regressor and c.align_weight != 0:
            raise ValueError(
                "CAE without a regressor has no predicted latents to align: set model.align_weight=0 "
                "with model.use_regressor=false"
            )
        self.encoder = VisionTransformer(
            c.img_size, c.patch_size, c.in_chans, c.embed_dim, c.depth, c.num_heads, c.mlp_ratio,
            qkv_bias="qv", drop_path_rate=c.drop_path_rate, layer_scale_init=c.layer_scale_init,
            norm_eps=c.norm_eps, pos_layout="cae",
        )  # fmt: skip
        self.patch_size = c.patch_size
        self.grid_size = self.encoder.grid_size
        self.mask_generator = MaskGenerator(c.mask_kind, self.grid_size, c.mask_ratio)

        # Frozen tokenizer for token targets; part of the state dict so a checkpoint is self-contained.
        self.tokenizer: Tokenizer | None = None
        if c.target == "token" and c.tokenizer_path is None and c.vocab_size:
            out_dim = c.vocab_size  # an imported token head; forward takes the target ids
        elif c.target == "token":
            self.tokenizer = self._load_tokenizer()
            out_dim = self.tokenizer.codebook_size
        else:
            ph, pw = self.encoder.patch_embed.patch_size
            out_dim = ph * pw * c.in_chans

        # Position table of the regressor and the decoder (the authors' `rd_pos_embed`, class row first).
        rd_pos = sincos_2d(c.embed_dim, self.grid_size, cls_token=True, layout="cae").unsqueeze(0)
        self.rd_pos_embed = nn.Parameter(rd_pos, requires_grad=False)  # [1, 1 + L, D]

        # Latent contextual regressor: one learned mask token per masked patch, cross-attending to the
        # visible patch latents and the current queries.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        heads = c.decoder_num_heads or c.num_heads
        self.regressor_blocks = nn.ModuleList(
            CrossAttentionBlock(
                c.embed_dim, heads, c.mlp_ratio, "qv", rate, c.decoder_layer_scale_init, c.norm_eps
            )
            for rate in _drop_path_rates(c.drop_path_rate, c.regressor_depth if c.use_regressor else 0)
        )
        self.regressor_norm = nn.LayerNorm(c.embed_dim, eps=c.norm_eps) if c.use_regressor else nn.Identity()

        # Decoder over the regressor's output only (never the visible latents).
        self.decoder_blocks = nn.ModuleList(
            Block(c.embed_dim, heads, c.mlp_ratio, "qv", rate, c.decoder_layer_scale_init, c.norm_eps)
            for rate in _drop_path_rates(c.drop_path_rate, c.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(c.embed_dim, eps=c.norm_eps)
        self.decoder_pred = nn.Linear(c.embed_dim, out_dim)

        for m in (self.regressor_blocks, self.regressor_norm, self.decoder_blocks, self.decoder_norm,
                  self.decoder_pred):  # fmt: skip
            init_linear_and_norm(m)
        for t in (self.encoder.patch_embed.proj.weight, self.encoder.cls_token, self.mask_token):
            _init_token_like(t)

        # EMA teacher only when momentum > 0; at momentum 0 the live encoder (no grad) gives the target.
        self.teacher: VisionTransformer | None = None
        if c.momentum > 0:
            self.teacher = copy.deepcopy(self.encoder).requires_grad_(False)

    def _load_tokenizer(self) -> Tokenizer:
        c = self.config
        if not c.tokenizer_path:
            raise ValueError(
                "CAE with target='token' needs a tokenizer: train one with `mimkit tokenizer train ... "
                "--out tok.safetensors` and set tokenizer_path, or use target='pixel'"
            )
        if not Path(c.tokenizer_path).exists():
            raise FileNotFoundError(f"tokenizer file {c.tokenizer_path} not found; check tokenizer_path")
        from ..tokenizers import load_tokenizer

        tok = load_tokenizer(c.tokenizer_path).requires_grad_(False).eval()
        if not isinstance(tok, Tokenizer):
            raise TypeError(f"{c.tokenizer_path} did not give a tokenizer (encode, grid_size, codebook_size)")
        if tuple(tok.grid_size(self.encoder.patch_embed.img_size)) != tuple(self.grid_size):
            raise ValueError(
                f"tokenizer gives a {tok.grid_size(self.encoder.patch_embed.img_size)} token grid but CAE's "
                f"patch grid is {self.grid_size}; train the tokenizer with --patch-size {self.patch_size}"
            )
        if c.vocab_size is not None and c.vocab_size != tok.codebook_size:
            raise ValueError(
                f"vocab_size={c.vocab_size} but the tokenizer has {tok.codebook_size} codes; "
                "drop vocab_size or set it to the tokenizer's codebook size"
            )
        return tok

    def train(self, mode: bool = True) -> CAE:
        super().train(mode)
        if self.tokenizer is not None:
            self.tokenizer.eval()
        if self.teacher is not None and self.config.teacher_mode == "eval":
            self.teacher.eval()
        return self

    # ----------------------------------------------------------------------------------------------
    def forward_encoder(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W], [B, L] -> latent [B, 1 + V, D] (class token first, visible tokens in grid order)."""
        return self.encoder.forward_features(images, mask)

    def _positions(self, mask: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions of the visible [B, V, D] and the masked [B, M, D] patches, grid order (`rd_pos_embed`)."""
        pos = self.rd_pos_embed[:, 1:].to(dtype).expand(mask.shape[0], -1, -1)  # [B, L, D]
        return gather_visible(pos, mask), gather_visible(pos, ~mask)

    def forward_regressor(self, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encoder output [B, 1 + V, D] -> predicted latents of the masked patches Z_m [B, M, D].

        The class token is dropped: keys/values are the visible patch latents and the current queries (as the
        authors). The visible latents are read, never written.
        """
        z_vis = latent[:, 1:]  # [B, V, D]
        pos_vis, pos_m = self._positions(mask, latent.dtype)
        x_q = self.mask_token.to(latent.dtype).expand(pos_m.shape[0], pos_m.shape[1], -1)  # [B, M, D]
        pos_kv = torch.cat([pos_vis, pos_m], dim=1)  # [B, V + M, D]
        for block in self.regressor_blocks:
            x_q = block(x_q, torch.cat([z_vis, x_q], dim=1), pos_m, pos_kv)
        return self.regressor_norm(x_q)

    def forward_decoder(self, latent_masked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Latents of the masked patches [B, M, D] -> predictions [B, M, K] (pixels or token logits)."""
        x = latent_masked + self._positions(mask, latent_masked.dtype)[1]  # [B, M, D]
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))

    def forward_decoder_without_regressor(self, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Ablation (use_regressor=False): encoder output [B, 1 + V, D] -> predictions [B, M, K] of the masked
        patches from a decoder over all L positions: visible latents, the mask token elsewhere."""
        x = scatter_visible(latent[:, 1:], mask, self.mask_token.flatten())  # [B, L, D]
        x = x + self.rd_pos_embed[:, 1:].to(x.dtype)
        for block in self.decoder_blocks:
            x = block(x)
        pred = self.decoder_pred(self.decoder_norm(x))  # [B, L, K]
        return gather_visible(pred, ~mask)  # [B, M, K]

    @torch.no_grad()
    def alignment_target(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """sg(encoder output on the masked patches alone) [B, M, D], class token dropped.

        Momentum 0: the live encoder under no_grad (no copy of the weights). Momentum > 0: the EMA teacher.
        teacher_mode "train" runs it in the model's mode (in training, drop-path makes the target stochastic,
        as the authors' code); "eval" switches stochastic depth off for this pass.
        """
        net = self.teacher if self.teacher is not None else self.encoder
        with _eval_mode(net) if self.config.teacher_mode == "eval" else contextlib.nullcontext():
            return net.forward_features(images, ~mask)[:, 1:].detach()

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """EMA update of the teacher, teacher = m * teacher + (1 - m) * encoder; no-op at momentum 0.

        The trainer calls this after every optimizer step (on the unwrapped model).
        """
        if self.teacher is None:
            return
        t_params: list[torch.Tensor] = list(self.teacher.parameters())
        s_params = [p.detach().to(t.dtype) for p, t in zip(self.encoder.parameters(), t_params)]
        torch._foreach_lerp_(t_params, s_params, 1.0 - self.config.momentum)

    # ----------------------------------------------------------------------------------------------
    def decode_target(self, images: torch.Tensor) -> torch.Tensor:
        """Targets for every patch: normalised pixels [B, L, p*p*C] (float) or token ids [B, L] (long)."""
        if self.config.target == "token":
            if self.tokenizer is None:
                raise ValueError(
                    "this CAE predicts tokenizer ids but has no tokenizer: set tokenizer_path (e.g. `mimkit "
                    "import ... --set tokenizer_path=tok.safetensors`) or pass target_ids to forward"
                )
            with torch.no_grad():
                return self.tokenizer.encode(images)
        return pixel_target(images, self.patch_size, self.config.norm_pix_loss)

    def forward_loss(
        self,
        images: torch.Tensor,
        pred_m: torch.Tensor,
        mask: torch.Tensor,
        target_ids: torch.Tensor | None = None,
    ) -> LossTerms:
        """Decoder loss on the masked patches; `target_ids` [B, L] stands in for the tokenizer's ids."""
        target = target_ids if target_ids is not None else self.decode_target(images)
        if self.config.target == "token":
            ids = gather_visible(target.unsqueeze(-1), ~mask).squeeze(-1)  # [B, M]
            logits = pred_m.float().flatten(0, 1)  # [B*M, K]
            loss = F.cross_entropy(logits, ids.flatten())
            acc = (logits.argmax(-1) == ids.flatten()).float().mean()
            return LossTerms(loss, {"token_acc": acc.detach()})
        target_m = gather_visible(target, ~mask)  # [B, M, K]
        return LossTerms((pred_m.float() - target_m.float()).pow(2).mean())

    def _full_pred(self, pred_m: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, M, K] masked predictions -> [B, L, K]; visible positions are zeros (CAE predicts no
        visible patch)."""
        B, L = mask.shape
        pred = pred_m.new_zeros(B, L, pred_m.shape[-1])
        pred[mask] = pred_m.reshape(-1, pred_m.shape[-1])
        return pred

    def forward(
        self, images: torch.Tensor, mask: torch.Tensor | None = None, target_ids: torch.Tensor | None = None
    ) -> MIMOutput:
        """-> MIMOutput(loss, pred [B, L, K] (zeros at visible positions), mask, metrics:
        loss_decode, loss_align (+ token_acc for token targets)). `target_ids` [B, L]: token targets given
        by the caller instead of the model's tokenizer."""
        if mask is None:
            mask = self.mask_generator(images.shape[0])
        mask = mask.to(images.device)
        latent = self.forward_encoder(images, mask)  # [B, 1 + V, D]
        target_latent = latent_m = None
        if self.config.use_regressor:
            latent_m = self.forward_regressor(latent, mask)  # [B, M, D]
            if self.config.align_weight != 0:  # at 0 (ablation) the alignment pass is skipped altogether
                target_latent = self.alignment_target(images, mask)  # [B, M, D], no grad
            pred_m = self.forward_decoder(latent_m, mask)  # [B, M, K]
        else:  # ablation: MAE-style decoder on the encoder's latents
            pred_m = self.forward_decoder_without_regressor(latent, mask)  # [B, M, K]
        loss, extra = self.forward_loss(images, pred_m, mask, target_ids)
        metrics = {"loss_decode": loss.detach(), **extra}
        if latent_m is not None and target_latent is not None:
            loss_align = F.mse_loss(latent_m.float(), target_latent.float())
            loss = loss + self.config.align_weight * loss_align
            metrics["loss_align"] = loss_align.detach()
        pred = self._full_pred(pred_m, mask)
        return MIMOutput(loss=loss, pred=pred, mask=mask, metrics=metrics, features=latent[:, 0])

    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct_without_regressor(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Decode the encoder's own latents of the masked patches, skipping the regressor -> [B, L, K].

        The paper's latent-space check: the encoder is run on the masked patches as if they were the
        visible set (exactly the alignment target), and those latents go straight into the decoder. If the
        regressor's output and the encoder's output share one latent space, this reconstructs the masked
        patches too. Visible positions are zeros, as in `forward`'s pred.
        """
        latent_m = self.encoder.forward_features(images, ~mask)[:, 1:]  # [B, M, D]
        return self._full_pred(self.forward_decoder(latent_m, mask), mask)

    @torch.no_grad()
    def extra_reconstructions(self, images: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """For `mimkit visualize`: predictions [B, L, p*p*C] decoded straight from the encoder (pixel targets
        only; empty for token targets). The regressor path is `forward(...).pred`."""
        if self.config.target == "token":
            return {}
        return {"encoder -> decoder": self.reconstruct_without_regressor(images, mask.to(images.device))}


__all__ = ["CAE", "CAEConfig"]


def _preset(**kw) -> CAEConfig:
    return CAEConfig(**kw)


register_model(
    "cae_vit_tiny_patch4_32",
    CAE,
    _preset(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, regressor_depth=2,
            decoder_depth=2),
)  # fmt: skip
register_model("cae_vit_small_patch16_224", CAE, _preset(embed_dim=384, depth=12, num_heads=6))
register_model("cae_vit_base_patch16_224", CAE, _preset(embed_dim=768, depth=12, num_heads=12))
# Large: layer scale 1e-5 in the encoder only; the authors' factory leaves the regressor and decoder at 0.1.
register_model(
    "cae_vit_large_patch16_224", CAE, _preset(embed_dim=1024, depth=24, num_heads=16, layer_scale_init=1e-5)
)
