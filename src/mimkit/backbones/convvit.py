"""ConvMAE's hybrid convolution-transformer encoder (Gao et al., 2022), on visible patches, any input size.

Three stages; with the Base strides (4, 2, 2) the stage grids are H/4, H/8 and H/16:

    image [B, C, H, W]
      patch_embed1 (conv k=s=4 -> LayerNorm -> GELU) -> blocks1 (ConvBlock x d1)   stage 1, H/4,  C1
      patch_embed2 (conv k=s=2 -> LayerNorm -> GELU) -> blocks2 (ConvBlock x d2)   stage 2, H/8,  C2
      patch_embed3 (conv k=s=2 -> LayerNorm -> GELU) -> patch_embed4 (Linear)      stage 3, H/16, D
      + fixed 2D sin-cos pos embed, keep the visible tokens -> blocks3 (ViT Block x d3)
      + stage1_output_decode(stage 1) (conv k=s=4) + stage2_output_decode(stage 2) (conv k=s=2)
      -> norm -> [B, visible, D]

A `ConvBlock` is a transformer block whose attention is 1x1 conv -> 5x5 depthwise conv -> 1x1 conv and whose
MLP is two 1x1 convs (pre-norm, residuals, optional drop path). The mask is drawn on the stage-3 grid
(True = masked) and upsampled to the stage-1/2 grids. **Masked convolution**: in every ConvBlock the input
of the depthwise conv is multiplied by the visible mask, so no visible position receives information from a
masked region. Every other operation is either per position or a conv with kernel = stride that never
crosses a stage-3 patch border, so the visible latents depend on the visible pixels alone (tested exactly).

Two exact ways to run a masked batch (`skip_masked`):

- dense (the authors' way): stages 1-2 on the full maps, depthwise inputs multiplied by the visible mask;
- visible-only (default): because nothing visible depends on a masked position, stages 1-2 are computed
  only for the cells of the visible stage-3 patches: per-position ops (LayerNorm, 1x1 convs, MLP, the
  kernel = stride patch embeddings) run on the gathered visible cells, and only the cheap depthwise conv
  sees a full map, built by scattering the visible cells into zeros (the same zeros the mask multiplication
  would give). Same result as the dense path, about (1 - mask_ratio) of its stage-1/2 matmul work.

Internally every feature is channel-last: a full map is [B, h, w, C]; visible cells are [B, K, r, r, C]
(K visible stage-3 patches, each covering r x r positions of the stage: r = 4 for stage 1 and 2 for stage 2
with the Base strides). 1x1 convs run as Linear layers and kernel = stride convs as Linear layers on
space-to-depth patches, with the conv weights of the authors' layout, so their checkpoints load unchanged.

State-dict keys follow the authors' layout: patch_embed{1,2,3}.{proj,norm}, patch_embed4, pos_embed,
blocks{1,2}.N.{norm1,conv1,attn,conv2,norm2,mlp.fc1,mlp.fc2}, blocks3.N.{norm1,attn.qkv,attn.proj,norm2,
mlp.fc1,mlp.fc2}, stage{1,2}_output_decode, norm. LayerNorm eps: 1e-5 in patch embeddings and ConvBlocks
(the authors use nn.LayerNorm's default there), 1e-6 in the ViT blocks and the final norm.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import Block, DropPath, sincos_2d, to_2tuple
from ..masking import upsample_mask
from .vit import gather_visible, init_linear_and_norm, take_indices, tokens_to_map, visible_index

SpatialMix = Callable[[torch.Tensor, nn.Conv2d], torch.Tensor]


def space_to_depth(x: torch.Tensor, factor: int) -> torch.Tensor:
    """[..., h, w, C] -> [..., h/f, w/f, f*f*C]; each f x f cell flattened in (row, column, channel) order."""
    *lead, h, w, C = x.shape
    x = x.reshape(*lead, h // factor, factor, w // factor, factor, C).transpose(-4, -3)
    return x.reshape(*lead, h // factor, w // factor, factor * factor * C)


def conv_as_linear(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A kernel = stride Conv2d applied to space-to-depth patches x [..., k*k*Cin] -> [..., Cout].

    For a 1x1 conv this is the conv itself on a channel-last tensor.
    """
    w = conv.weight
    if w.shape[2:] == (1, 1):  # the same order; a plain view keeps the gradient's strides standard, so DDP
        weight = w.flatten(1)  # copies no gradient into its buckets (it warned "grad strides do not match")
    else:
        weight = w.permute(0, 2, 3, 1).flatten(1)  # [Cout, kh*kw*Cin], (row, column, channel) order
    return F.linear(x, weight, conv.bias)


def depthwise_nhwc(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A (depthwise) Conv2d on a channel-last map [B, h, w, C] -> [B, h, w, C] (channels-last memory).

    On CPU a reduced-precision input is computed in float32: oneDNN's bf16 depthwise backward on channels-last
    maps is about 2x slower than its float32 one (measured: 380 vs 180 ms for [8, 256, 56, 56], 5x5).
    """
    dtype = x.dtype
    # The weight through a flat view: its gradient then comes back with standard strides, not the
    # channels-last ones of the conv's backward, which DDP would copy into its buckets every step.
    weight = conv.weight.flatten(1).view(conv.weight.shape)
    if x.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", enabled=False):
            out = F.conv2d(
                x.float().permute(0, 3, 1, 2), weight.float(), None if conv.bias is None else conv.bias.float(), conv.stride, conv.padding,
                conv.dilation, conv.groups,
            )  # fmt: skip
        return out.permute(0, 2, 3, 1).to(dtype)
    out = F.conv2d(
        x.permute(0, 3, 1, 2), weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups
    )
    return out.permute(0, 2, 3, 1)


def map_to_cells(x: torch.Tensor, grid_size: tuple[int, int], mask: torch.Tensor) -> torch.Tensor:
    """Visible cells of a full map: [B, gh*r, gw*r, C] + [B, L] mask -> [B, K, r, r, C] (grid order)."""
    B, h, w, C = x.shape
    gh, gw = grid_size
    r = h // gh
    cells = x.reshape(B, gh, r, gw, r, C).transpose(2, 3).reshape(B, gh * gw, r, r, C)
    return gather_visible(cells, mask)


def _check_equal_counts(mask: torch.Tensor) -> None:
    if mask.device.type != "cpu":
        return  # checked by visible_index where the mask is used, in the one host sync it needs anyway
    keep = (~mask).sum(dim=1)
    if keep.numel() and bool((keep != keep[0]).any()):
        raise ValueError("every image in a batch must have the same number of masked patches")


def _masked_depthwise(mask: torch.Tensor, grid_size: tuple[int, int], r: int) -> SpatialMix:
    """Dense masked convolution: multiply the depthwise input [B, gh*r, gw*r, C] by the visible map first."""
    B, (gh, gw) = mask.shape[0], grid_size
    visible = ~upsample_mask(mask, grid_size, r).reshape(B, gh * r, gw * r, 1)  # [B, h, w, 1], True = visible

    def mix(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        return depthwise_nhwc(x * visible.to(x.dtype), conv)

    return mix


class VisibleCells:
    """Where the visible cells of one stage sit in that stage's full map, for the depthwise conv.

    mask [B, L] on the stage-3 grid (gh, gw); r = positions per stage-3 patch side at this stage.
    `depthwise(x, conv)`: x [B, K, r, r, C] -> scatter into a zero map [B, gh*r, gw*r, C], conv, gather back.
    The zeros at masked positions are exactly what the dense path's mask multiplication produces.
    """

    def __init__(self, mask: torch.Tensor, grid_size: tuple[int, int], r: int):
        B = mask.shape[0]
        gh, gw = grid_size
        self.shape = (B, gh * r, gw * r)
        visible = visible_index(mask)  # [B, K] grid order; no data-dependent shape after the count
        patch = visible.flatten()  # [B*K], batch-major grid order, as mask-indexing
        b = torch.arange(B, device=mask.device).repeat_interleave(visible.shape[1])
        offs = torch.arange(r, device=mask.device)
        rows = (patch // gw * r)[:, None, None] + offs[None, :, None]  # [B*K, r, 1]
        cols = (patch % gw * r)[:, None, None] + offs[None, None, :]  # [B*K, 1, r]
        self.index = ((b[:, None, None] * (gh * r) + rows) * (gw * r) + cols).flatten()  # [B*K*r*r]

    def depthwise(self, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        B, h, w = self.shape
        C = x.shape[-1]
        full = x.new_zeros(B * h * w, C).index_copy(0, self.index, x.reshape(-1, C))
        out = depthwise_nhwc(full.view(B, h, w, C), conv)  # [B, h, w, C]
        return out.reshape(B * h * w, C).index_select(0, self.index).view_as(x)


class ConvPatchEmbed(nn.Module):
    """Conv2d with kernel = stride, LayerNorm over channels, GELU (the authors' `PatchEmbed`: proj, norm).

    forward: space-to-depth patches [..., s*s*Cin] (see `space_to_depth`) -> [..., C]; this equals
    GELU(LayerNorm(Conv2d(x))) on the map, computed as a Linear with the conv's weight.
    """

    def __init__(self, in_chans: int, embed_dim: int, stride: int, norm_eps: float = 1e-5):
        super().__init__()
        self.stride = stride
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=stride, stride=stride)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.act = nn.GELU()

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(conv_as_linear(self.proj, patches)))


class ConvMlp(nn.Module):
    """Two 1x1 convs with GELU between, on a channel-last tensor [..., C] (keys fc1, fc2 as Conv2d)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_as_linear(self.fc2, self.act(conv_as_linear(self.fc1, x)))


class ConvBlock(nn.Module):
    """Pre-norm conv block: x + conv2(dw(conv1(norm1(x)))), then x + mlp(norm2(x)) (the authors' `CBlock`).

    Works on any channel-last layout ([B, h, w, C] maps or [B, K, r, r, C] visible cells): the only spatial
    operation, the depthwise conv `attn`, is delegated to `spatial_mix(h, self.attn)`, which applies the
    visible mask (dense path) or works on scattered visible cells (visible-only path).
    """

    def __init__(
        self,
        dim: int,
        mlp_ratio: float = 4.0,
        kernel_size: int = 5,
        drop_path: float = 0.0,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, spatial_mix: SpatialMix) -> torch.Tensor:
        h = conv_as_linear(self.conv1, self.norm1(x))
        h = conv_as_linear(self.conv2, spatial_mix(h, self.attn))
        x = x + self.drop_path(h)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvViT(nn.Module):
    """ConvMAE encoder. Encoder contract (docs/design.md) with `num_prefix_tokens = 0`.

    img_size sets the stored `pos_embed` (authors' layout); any other H, W divisible by the total stride
    (`patch_size`, 16 for the Base strides), square or not, works too: its sin-cos embedding is computed on
    the fly. `blocks` is `blocks3` (the ViT blocks) and `num_layers` their count.

    layer_id convention (layer-wise lr decay), as the authors': 0 = everything before the ViT blocks
    (patch_embed1..4, pos_embed, blocks1, blocks2), i + 1 = blocks3.i, num_layers + 1 = the final norm and
    the stage1/2_output_decode fusion convs (they act after the last block).

    timm's feature contract: `feature_info` lists stage 1 ("blocks1", C1, stride s1), stage 2 ("blocks2", C2,
    s1*s2) and every ViT block ("blocks3.i", D, P); `forward_intermediates` picks among them by position.

    skip_masked: run masked batches on visible cells only in stages 1-2 (exact, faster; see module doc).
    masked_conv: multiply depthwise-conv inputs by the visible mask (the paper's point). False is the leaky
    variant for the ablation (and to show the leak test can fail): it forces the dense path, since the
    visible-only path cannot leak.
    multiscale_fusion: add the stage-1/2 outputs (strided convs) to the ViT output before the final norm,
    as the paper; False drops the fusion (ablation) and the two fusion convs.
    """

    num_prefix_tokens = 0

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        embed_dims: tuple[int, int, int] = (256, 384, 768),
        depths: tuple[int, int, int] = (2, 2, 11),
        strides: tuple[int, int, int] = (4, 2, 2),
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        dw_kernel: int = 5,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        conv_norm_eps: float = 1e-5,
        skip_masked: bool = True,
        masked_conv: bool = True,
        multiscale_fusion: bool = True,
    ):
        super().__init__()
        if len(embed_dims) != 3 or len(depths) != 3 or len(strides) != 3:
            raise ValueError("embed_dims, depths and strides need one entry per stage (3 each)")
        self.img_size = to_2tuple(img_size)
        self.in_chans = in_chans
        self.strides = tuple(int(s) for s in strides)
        self.patch_size = math.prod(self.strides)
        self.embed_dims = tuple(embed_dims)
        self.embed_dim = embed_dims[2]
        self.skip_masked = skip_masked
        self.masked_conv = masked_conv
        self.multiscale_fusion = multiscale_fusion
        self.grid_size = self.grid_for(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        s1, s2, s3 = self.strides
        c1, c2, d = self.embed_dims
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()

        self.patch_embed1 = ConvPatchEmbed(in_chans, c1, s1, conv_norm_eps)
        self.patch_embed2 = ConvPatchEmbed(c1, c2, s2, conv_norm_eps)
        self.patch_embed3 = ConvPatchEmbed(c2, d, s3, conv_norm_eps)
        self.patch_embed4 = nn.Linear(d, d)
        if multiscale_fusion:
            self.stage1_output_decode = nn.Conv2d(c1, d, s2 * s3, stride=s2 * s3)
            self.stage2_output_decode = nn.Conv2d(c2, d, s3, stride=s3)
        pos = sincos_2d(d, self.grid_size).unsqueeze(0)  # [1, L, D], no class token
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        self.blocks1 = nn.ModuleList(
            ConvBlock(c1, mlp_ratio, dw_kernel, rates[i], conv_norm_eps) for i in range(depths[0])
        )
        self.blocks2 = nn.ModuleList(
            ConvBlock(c2, mlp_ratio, dw_kernel, rates[depths[0] + i], conv_norm_eps) for i in range(depths[1])
        )
        self.blocks3 = nn.ModuleList(
            Block(d, num_heads, mlp_ratio, drop_path=rates[depths[0] + depths[1] + i], norm_eps=norm_eps)
            for i in range(depths[2])
        )
        self.norm = nn.LayerNorm(d, eps=norm_eps)
        self.feature_info = [
            {"num_chs": c1, "reduction": s1, "module": "blocks1"},
            {"num_chs": c2, "reduction": s1 * s2, "module": "blocks2"},
        ] + [{"num_chs": d, "reduction": self.patch_size, "module": f"blocks3.{i}"} for i in range(depths[2])]
        self.init_weights()

    # -- contract -------------------------------------------------------------------------------------

    @property
    def blocks(self) -> nn.ModuleList:
        return self.blocks3

    @property
    def num_layers(self) -> int:
        return len(self.blocks3)

    def init_weights(self) -> None:
        """As the authors: xavier-uniform Linear weights (bias 0), LayerNorm 1/0, patch_embed3's conv as a
        Linear over its flattened kernel; the other convs keep PyTorch's default init."""
        init_linear_and_norm(self)
        w = self.patch_embed3.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def layer_id(self, param_name: str) -> int:
        if param_name.startswith(("patch_embed", "pos_embed", "blocks1.", "blocks2.")):
            return 0
        if param_name.startswith("blocks3."):
            return int(param_name.split(".")[1]) + 1
        return self.num_layers + 1

    def grid_for(self, size: tuple[int, int] | torch.Tensor) -> tuple[int, int]:
        """Stage-3 grid (rows, cols) for an image size (h, w) or an image batch [B, C, H, W]."""
        h, w = (size.shape[-2], size.shape[-1]) if isinstance(size, torch.Tensor) else size
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(
                f"ConvMAE needs image sides divisible by its total stride {p}, got {h}x{w}; resize or crop to "
                f"{max(p, h // p * p)}x{max(p, w // p * p)}"
            )
        return h // p, w // p

    def pos_embed_for(self, grid_size: tuple[int, int]) -> torch.Tensor:
        """[1, L, D] fixed sin-cos embedding of a stage-3 grid (the stored one for the configured size)."""
        if tuple(grid_size) == self.grid_size:
            return self.pos_embed
        return sincos_2d(self.embed_dim, grid_size).unsqueeze(0).to(self.pos_embed.device)

    # -- forward --------------------------------------------------------------------------------------

    def _check(self, images: torch.Tensor, mask: torch.Tensor | None) -> tuple[int, int]:
        if images.ndim != 4 or images.shape[1] != self.in_chans:
            raise ValueError(
                f"expected images [B, {self.in_chans}, H, W], got {tuple(images.shape)}; "
                "build the model with a matching in_chans"
            )
        grid = self.grid_for(images)
        if mask is not None:
            if mask.dtype != torch.bool or tuple(mask.shape) != (images.shape[0], grid[0] * grid[1]):
                raise ValueError(
                    f"mask must be bool [B, {grid[0] * grid[1]}] on the stage-3 grid {grid} (True = masked), "
                    f"got {mask.dtype} {tuple(mask.shape)}"
                )
            _check_equal_counts(mask)
        return grid

    def _stages(
        self, x: torch.Tensor, mix1: SpatialMix, mix2: SpatialMix
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Stages 1-3 up to patch_embed4 on a channel-last layout; x [..., h, w, Cin] pixels.

        Returns stage-1 and stage-2 outputs ([..., h/s1, w/s1, C1], [..., h/(s1 s2), w/(s1 s2), C2]), the
        stage-3 tokens and the multi-scale fusion term (sum of both strided convs), each [..., h/P, w/P, D];
        the fusion term is None without multiscale_fusion.
        """
        s1, s2, s3 = self.strides
        x1 = self.patch_embed1(space_to_depth(x, s1))
        for blk in self.blocks1:
            x1 = blk(x1, mix1)
        x2 = self.patch_embed2(space_to_depth(x1, s2))
        for blk in self.blocks2:
            x2 = blk(x2, mix2)
        x3 = self.patch_embed4(self.patch_embed3(space_to_depth(x2, s3)))
        if not self.multiscale_fusion:
            return x1, x2, x3, None
        fuse1 = conv_as_linear(self.stage1_output_decode, space_to_depth(x1, s2 * s3))
        fuse2 = conv_as_linear(self.stage2_output_decode, space_to_depth(x2, s3))
        return x1, x2, x3, fuse1 + fuse2

    def _fused_norm(self, x: torch.Tensor, fuse: torch.Tensor | None) -> torch.Tensor:
        """Final output of ViT tokens [B, N, D]: norm(x + fusion), or norm(x) without multi-scale fusion."""
        return self.norm(x if fuse is None else x + fuse)

    def _transformer(self, x: torch.Tensor, fuse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """ViT blocks on [B, N, D] tokens, then multi-scale fusion and the final norm -> (pre-fusion, out)."""
        for blk in self.blocks3:
            x = blk(x)
        return x, self._fused_norm(x, fuse)

    def _forward_dense(self, images: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Full maps in stages 1-2 (masked depthwise inputs when `mask` is given); the authors' computation."""
        grid = self._check(images, mask)
        B = images.shape[0]
        s1, s2, _ = self.strides
        mix1: SpatialMix = depthwise_nhwc
        mix2: SpatialMix = depthwise_nhwc
        if mask is not None and self.masked_conv:
            r1, r2 = self.patch_size // s1, self.patch_size // (s1 * s2)
            mix1, mix2 = _masked_depthwise(mask, grid, r1), _masked_depthwise(mask, grid, r2)
        x1, x2, x3, fuse = self._stages(images.permute(0, 2, 3, 1), mix1, mix2)
        tokens = x3.reshape(B, -1, self.embed_dim) + self.pos_embed_for(grid).to(x3.dtype)  # [B, L, D]
        if fuse is not None:
            fuse = fuse.reshape(B, -1, self.embed_dim)  # [B, L, D]
        if mask is not None:
            tokens = gather_visible(tokens, mask)  # [B, K, D]
            fuse = None if fuse is None else gather_visible(fuse, mask)
        pre, out = self._transformer(tokens, fuse)
        return {"stage1": x1, "stage2": x2, "stage3": pre, "out": out}

    def _forward_visible(self, images: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stages 1-2 on the visible cells only; returns stage1/2 as visible cells [B, K, r, r, C]."""
        grid = self._check(images, mask)
        B, C = images.shape[:2]
        P, (s1, s2, _) = self.patch_size, self.strides
        pixels = images.reshape(B, C, grid[0], P, grid[1], P).permute(
            0, 2, 4, 3, 5, 1
        )  # [B, gh, gw, P, P, C]
        pixels = gather_visible(pixels.reshape(B, -1, P, P, C), mask)  # [B, K, P, P, C] visible only
        cells1, cells2 = VisibleCells(mask, grid, P // s1), VisibleCells(mask, grid, P // (s1 * s2))
        x1, x2, x3, fuse = self._stages(pixels, cells1.depthwise, cells2.depthwise)
        K = pixels.shape[1]
        pos = gather_visible(self.pos_embed_for(grid).expand(B, -1, -1), mask)  # [B, K, D]
        tokens = x3.reshape(B, K, self.embed_dim) + pos.to(x3.dtype)
        pre, out = self._transformer(tokens, None if fuse is None else fuse.reshape(B, K, self.embed_dim))
        return {"stage1": x1, "stage2": x2, "stage3": pre, "out": out}

    def forward_stages(self, images: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Visible latents of every stage, in one layout whichever path computed them.

        images [B, C, H, W], mask [B, L] bool (True = masked) on the stage-3 grid ->
        {"stage1": [B, K, r1, r1, C1], "stage2": [B, K, r2, r2, C2] (the cells of the K visible patches),
         "stage3": [B, K, D] (ViT blocks' output, before fusion), "out": [B, K, D] (= forward_features)}.
        """
        if self.skip_masked and self.masked_conv:
            return self._forward_visible(images, mask)
        feats = self._forward_dense(images, mask)
        grid = self.grid_for(images)
        feats["stage1"] = map_to_cells(feats["stage1"], grid, mask)
        feats["stage2"] = map_to_cells(feats["stage2"], grid, mask)
        return feats

    def forward_features(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, C, H, W] (+ [B, L] bool mask on the stage-3 grid, True = hidden) -> [B, visible, D], after the
        final norm, tokens in grid order (all L tokens when mask is None)."""
        if mask is None:
            return self._forward_dense(images, None)["out"]
        if self.skip_masked and self.masked_conv:
            return self._forward_visible(images, mask)["out"]
        return self._forward_dense(images, mask)["out"]

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
        """Features picked by `indices` among `feature_info` (stage 1, stage 2, then each ViT block), on full
        images, with timm's arguments: None = all, n = the last n, a sequence = those positions.

        output_fmt "NCHW": [B, C, H/r, W/r] maps; "NLC": [B, (H/r)(W/r), C]. norm: a ViT block's output is
        fused with stages 1-2 and normed as the final output is (`norm(x + fusion)`), so the last block with
        norm=True equals forward_features; stages 1-2 have no norm of their own and come back as they are.
        There are no prefix tokens (return_prefix_tokens is accepted and changes nothing, as in timm).
        Returns the list when intermediates_only, else ([B, L, D] forward_features(x), list).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        taken = take_indices(len(self.feature_info), indices)
        grid = self._check(x, None)
        B = x.shape[0]
        x1, x2, x3, fuse = self._stages(x.permute(0, 2, 3, 1), depthwise_nhwc, depthwise_nhwc)
        features: list[torch.Tensor] = []  # [B, C, h, w] maps, NCHW
        if 0 in taken:
            features.append(x1.permute(0, 3, 1, 2).contiguous())
        if 1 in taken:
            features.append(x2.permute(0, 3, 1, 2).contiguous())
        tokens = x3.reshape(B, -1, self.embed_dim) + self.pos_embed_for(grid).to(x3.dtype)  # [B, L, D]
        if fuse is not None:
            fuse = fuse.reshape(B, -1, self.embed_dim)  # [B, L, D]
        blocks = self.blocks3[: max(0, taken[-1] - 1)] if stop_early else self.blocks3
        for i, block in enumerate(blocks):
            tokens = block(tokens)
            if i + 2 in taken:
                features.append(tokens_to_map(self._fused_norm(tokens, fuse) if norm else tokens, grid))
        if output_fmt == "NLC":
            features = [f.flatten(2).transpose(1, 2) for f in features]  # [B, h*w, C]
        if intermediates_only:
            return features
        return self._fused_norm(tokens, fuse), features

    def forward_pyramid(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Feature pyramid on full images for detection / segmentation heads.

        images [B, C, H, W] -> {"stride4": [B, C1, H/4, W/4] stage-1 output,
                                "stride8": [B, C2, H/8, W/8] stage-2 output,
                                "stride16": [B, D, H/16, W/16] final encoder output (fused, normed),
                                "stride32": [B, D, ceil(H/32), ceil(W/32)] 2x2 max-pool of stride16}.
        Keys name the actual strides (s1, s1*s2, P, 2P); those above are for the Base strides (4, 2, 2).
        Maps are NCHW views of channels-last memory; call .contiguous() if a head needs NCHW memory.
        """
        grid = self._check(images, None)
        feats = self._forward_dense(images, None)
        s1, s2, _ = self.strides
        p = self.patch_size
        top = feats["out"].reshape(images.shape[0], grid[0], grid[1], self.embed_dim).permute(0, 3, 1, 2)
        return {
            f"stride{s1}": feats["stage1"].permute(0, 3, 1, 2),
            f"stride{s1 * s2}": feats["stage2"].permute(0, 3, 1, 2),
            f"stride{p}": top,
            f"stride{2 * p}": F.max_pool2d(top, 2, ceil_mode=True),
        }
