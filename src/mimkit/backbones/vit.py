"""ViT encoder that runs on visible tokens only. State-dict keys are timm's VisionTransformer names."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..layers import Block, PatchEmbed, sincos_2d


def visible_index(mask: torch.Tensor) -> torch.Tensor:
    """[B, L] bool mask (True = masked) -> [B, keep] int64 positions of the visible patches, in grid order.

    Every image must keep the same number of patches (ValueError otherwise). The count is read on the host
    once (one device sync when the mask lives on a GPU); the positions come from a stable sort, so there is
    no data-dependent shape after that and no further sync.
    """
    B, L = mask.shape
    if B == 0:
        return torch.zeros(0, 0, dtype=torch.long, device=mask.device)
    lo, hi = (L - mask.sum(dim=1)).aminmax()
    lo, hi = torch.stack([lo, hi]).tolist()
    if lo != hi:
        raise ValueError("every image in a batch must have the same number of masked patches")
    return torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices[:, :lo]  # visible (0) first


def gather_visible(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, L, ...] tokens, [B, L] bool mask (True = masked) -> [B, keep, ...] visible tokens in grid order.

    On the CPU by boolean indexing; on a GPU by `visible_index` + gather: one host sync (the count) instead
    of three (the equal-count check and the nonzero of boolean indexing, forward and backward). Same values.
    """
    if mask.device.type == "cpu":
        return _gather_by_mask(tokens, mask)
    return _gather_by_index(tokens, mask)


def _gather_by_mask(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    keep = (~mask).sum(dim=1)
    if keep.numel() and bool((keep != keep[0]).any()):
        raise ValueError("every image in a batch must have the same number of masked patches")
    return tokens[~mask].reshape(tokens.shape[0], -1, *tokens.shape[2:])


def _gather_by_index(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    index = visible_index(mask)  # [B, keep]
    B, L = tokens.shape[:2]
    flat = tokens.reshape(B, L, -1)
    out = flat.gather(1, index.unsqueeze(-1).expand(-1, -1, flat.shape[-1]))
    return out.reshape(B, index.shape[1], *tokens.shape[2:])


def take_indices(num_features: int, indices: int | Sequence[int] | None = None) -> list[int]:
    """timm's `indices` argument as sorted absolute positions among `num_features` features: None = all,
    an int n = the last n, a sequence = those positions (negative ones count from the end)."""
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f"indices={indices} asks for the last {indices} of {num_features} features")
        return list(range(num_features - indices, num_features))
    taken = []
    for i in indices:
        j = i + num_features if i < 0 else i
        if not 0 <= j < num_features:
            raise ValueError(f"feature index {i} is out of range for {num_features} features")
        taken.append(j)
    return sorted(set(taken))


def tokens_to_map(tokens: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """[B, h*w, C] tokens in row-major grid order -> [B, C, h, w] (contiguous NCHW)."""
    B, _, C = tokens.shape
    return tokens.reshape(B, grid_size[0], grid_size[1], C).permute(0, 3, 1, 2).contiguous()


def scatter_visible(visible_tokens: torch.Tensor, mask: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Inverse of `gather_visible`: [B, keep, D] -> [B, L, D], masked positions set to `fill` ([D]).

    On the CPU by boolean-mask assignment (measured fastest there); on a GPU without any host sync or
    data-dependent shape (CUDA graphs and torch.compile friendly): each position reads the visible token of
    its rank among the visible positions and masked positions take `fill`. Same values either way.
    """
    if mask.device.type == "cpu" or visible_tokens.shape[1] == 0:
        return _scatter_by_mask(visible_tokens, mask, fill)
    return _scatter_by_rank(visible_tokens, mask, fill)


def _scatter_by_mask(visible_tokens: torch.Tensor, mask: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    B, L = mask.shape
    D = visible_tokens.shape[-1]
    out = fill.to(visible_tokens.dtype).expand(B, L, D).clone()
    out[~mask] = visible_tokens.reshape(-1, D)
    return out


def _scatter_by_rank(visible_tokens: torch.Tensor, mask: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    B, L = mask.shape
    D = visible_tokens.shape[-1]
    fill = fill.to(visible_tokens.dtype)
    slot = ((~mask).cumsum(dim=1) - 1).clamp_(min=0)  # [B, L]: rank of each visible position
    spread = visible_tokens.gather(1, slot.unsqueeze(-1).expand(B, L, D))  # [B, L, D]
    return torch.where(mask.unsqueeze(-1), fill, spread)


class VisionTransformer(nn.Module):
    """ViT with a class token and a fixed 2D sin-cos position embedding (`pos_layout`: "mae" or "cae").

    Keys match `timm.create_model('vit_*', num_classes=0)`: cls_token, pos_embed, patch_embed.proj,
    blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}, norm.

    timm's feature contract: `forward_intermediates` (same arguments and results as timm's ViT / BEiT) and
    `feature_info`, one entry per block (num_chs = embed_dim, reduction = patch size, module "blocks.i").
    """

    num_prefix_tokens = 1

    def __init__(
        self,
        img_size=224,
        patch_size=16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool | str = True,
        drop_path_rate: float = 0.0,
        layer_scale_init: float | None = None,
        norm_eps: float = 1e-6,
        pos_layout: str = "mae",
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.in_chans = in_chans
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid_size = self.patch_embed.grid_size
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        pos = sincos_2d(embed_dim, self.grid_size, cls_token=True, layout=pos_layout).unsqueeze(
            0
        )  # [1, 1 + L, D]
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, rates[i], layer_scale_init, norm_eps)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        reduction = max(self.patch_embed.patch_size)
        self.feature_info = [
            {"num_chs": embed_dim, "reduction": reduction, "module": f"blocks.{i}"} for i in range(depth)
        ]
        self.init_weights()

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def init_weights(self) -> None:
        self.patch_embed.init_weights()
        nn.init.normal_(self.cls_token, std=0.02)
        init_linear_and_norm(self.blocks)
        init_linear_and_norm(self.norm)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, L, D] patch tokens with position embedding (no class token)."""
        return self.patch_embed(images) + self.pos_embed[:, 1:].to(images.dtype)

    def prepend_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1]).to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1)

    def forward_features(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, C, H, W] (+ [B, L] bool mask, True = hidden) -> [B, 1 + visible, D], after the final norm."""
        x = self.embed(images)
        if mask is not None:
            x = gather_visible(x, mask)
        x = self.prepend_cls(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    forward = forward_features

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list | tuple[torch.Tensor, list]:
        """Outputs of the blocks picked by `indices`, on full images (no mask), as timm's ViT.

        indices: None = every block, n = the last n, a sequence = those blocks (negative from the end).
        norm: apply the final norm to each. output_fmt: "NCHW" -> [B, D, H/p, W/p] maps, "NLC" -> [B, L, D]
        patch tokens; the class token is dropped (return_prefix_tokens: pairs (map, [B, 1, D] class token)).
        stop_early: skip the blocks after the last one picked (then the final features are not computed
        from every block). Returns the list when intermediates_only, else ([B, 1 + L, D] final features
        = forward_features(x), list).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        taken = take_indices(len(self.blocks), indices)
        blocks = self.blocks[: taken[-1] + 1] if stop_early else self.blocks
        x = self.prepend_cls(self.embed(x))  # [B, 1 + L, D]
        intermediates = []
        for i, block in enumerate(blocks):
            x = block(x)
            if i in taken:
                intermediates.append(self.norm(x) if norm else x)
        prefix = [y[:, : self.num_prefix_tokens] for y in intermediates]  # [B, 1, D] each
        intermediates = [y[:, self.num_prefix_tokens :] for y in intermediates]  # [B, L, D] each
        if output_fmt == "NCHW":
            intermediates = [tokens_to_map(y, self.grid_size) for y in intermediates]  # [B, D, h, w]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}

    def layer_id(self, param_name: str) -> int:
        """Depth index for layer-wise lr decay: 0 = embeddings, i + 1 = blocks.i, depth + 1 = final norm."""
        if param_name.startswith(("cls_token", "pos_embed", "patch_embed")):
            return 0
        if param_name.startswith("blocks."):
            return int(param_name.split(".")[1]) + 1
        return self.num_layers + 1


def init_linear_and_norm(module: nn.Module) -> None:
    """MAE init: xavier-uniform Linear weights, zero biases, LayerNorm weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
