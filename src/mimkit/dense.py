"""Feature pyramids for detection and segmentation heads, one interface for plain ViTs and ConvMAE.

    pyramid = mimkit.dense.build_pyramid(model.encoder, out_channels=256)
    levels = pyramid(images)          # {"p2": [B, 256, H/4, W/4], ..., "p5": [B, 256, H/32, W/32]}

Levels are named as detectron2 names them, `p{log2(stride)}`: a patch-16 ViT or a ConvMAE-B gives p2..p5
(strides 4, 8, 16, 32); the tiny CPU presets give finer ones (patch-4 ViT: p0..p3, ConvMAE tiny: p1..p4).
`pyramid.strides` and `pyramid.out_channels` say what came out.

Where the levels come from (`encoder_maps`, through the encoder's timm feature contract):

- plain ViT (MAE, CAE): the last block's output after the final norm, one map at stride p. The neck is
  ViTDet's simple feature pyramid (Li et al., 2022): 2x2 stride-2 deconvolutions up to p/4 (two, with a
  LayerNorm and GELU between) and p/2 (one), the map itself at p, a 2x2 max-pool to 2p; each followed by a
  1x1 conv and a 3x3 conv to `out_channels`, each conv without bias and followed by a channel LayerNorm.
- ConvMAE: its native hierarchy: stage 1 (stride p/4), stage 2 (p/2), the fused and normed output (p) and
  its 2x2 max-pool (2p), each through the same 1x1 / 3x3 LayerNorm convs.

The neck only needs the maps, so frozen-encoder heads can train on maps computed once
(`pyramid.neck(maps)`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .protocols import Encoder, as_method

__all__ = [
    "ConvPyramidNeck",
    "FeaturePyramid",
    "LayerNorm2d",
    "PixelEncoder",
    "SimpleFeaturePyramid",
    "build_pyramid",
    "encoder_at_size",
    "encoder_maps",
    "level_name",
    "to_detectron2_vit",
    "to_mmseg_vit",
]


def level_name(stride: int) -> str:
    """detectron2's level name for a stride: 4 -> "p2", 32 -> "p5"."""
    level = math.log2(stride)
    if level != int(level):
        raise ValueError(f"pyramid strides must be powers of 2, got {stride}")
    return f"p{int(level)}"


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (detectron2's "LN" for convs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def conv_ln(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """Conv (no bias, 'same' padding) + channel LayerNorm."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        LayerNorm2d(out_channels, eps=1e-6),
    )


def output_convs(in_channels: int, out_channels: int) -> nn.Sequential:
    """ViTDet's per-level output: 1x1 conv + LN, then 3x3 conv + LN."""
    return nn.Sequential(conv_ln(in_channels, out_channels, 1), conv_ln(out_channels, out_channels, 3))


def encoder_maps(encoder: Any, images: torch.Tensor) -> list[torch.Tensor]:
    """The encoder's deepest map at each distinct stride, finest first, as NCHW maps (final norm applied).

    Picks, through `encoder.feature_info` and `encoder.forward_intermediates` (timm's contract), the last
    feature of each reduction: a plain ViT gives one map (the normed last block); ConvMAE gives stage 1,
    stage 2 and the fused, normed output.
    """
    last_of: dict[int, int] = {}
    for i, info in enumerate(encoder.feature_info):
        last_of[int(info["reduction"])] = i
    picks = [last_of[r] for r in sorted(last_of)]
    return encoder.forward_intermediates(images, indices=picks, norm=True, intermediates_only=True)


def map_specs(encoder: Any) -> list[tuple[int, int]]:
    """(channels, stride) of each `encoder_maps` output, finest first."""
    last: dict[int, int] = {}
    for info in encoder.feature_info:
        last[int(info["reduction"])] = int(info["num_chs"])
    return [(last[r], r) for r in sorted(last)]


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's neck: one map [B, C, h, w] at stride s -> 4 levels at strides s/4, s/2, s, 2s, each
    [B, out_channels, ...]. Deconvolutions keep the ViTDet widths (C/2 after the first, C/4 after two).
    min_stride leaves out the levels finer than it (not built, not computed): a patch-4 ViT's stride-1
    level is rarely worth its cost."""

    def __init__(self, in_channels: int, stride: int, out_channels: int = 256, min_stride: int = 1):
        super().__init__()
        if stride < 4:
            raise ValueError(f"the simple feature pyramid needs an input stride of at least 4, got {stride}")
        c = in_channels
        keep = [s >= min_stride for s in (stride // 4, stride // 2)]
        self.strides = tuple(s for s, k in zip((stride // 4, stride // 2), keep) if k) + (stride, stride * 2)
        self.out_channels = out_channels
        self.up4 = (
            nn.Sequential(
                nn.ConvTranspose2d(c, c // 2, 2, stride=2),
                LayerNorm2d(c // 2, eps=1e-6),
                nn.GELU(),
                nn.ConvTranspose2d(c // 2, c // 4, 2, stride=2),
            )
            if keep[0]
            else None
        )
        self.up2 = nn.ConvTranspose2d(c, c // 2, 2, stride=2) if keep[1] else None
        widths = [w for w, k in zip((c // 4, c // 2), keep) if k] + [c, c]
        self.outputs = nn.ModuleList(output_convs(ch, out_channels) for ch in widths)

    def forward(self, maps: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        (x,) = maps[-1:]  # [B, C, h, w]
        scales = [up(x) for up in (self.up4, self.up2) if up is not None]
        scales += [x, F.max_pool2d(x, 2, ceil_mode=True)]
        return {level_name(s): conv(y) for s, conv, y in zip(self.strides, self.outputs, scales)}


class ConvPyramidNeck(nn.Module):
    """ConvMAE's native pyramid: maps at strides (s1, s2, s3) -> the same three plus a 2x2 max-pool of the
    coarsest (stride 2*s3), each through 1x1 / 3x3 LayerNorm convs to out_channels; levels finer than
    min_stride are left out."""

    def __init__(self, specs: list[tuple[int, int]], out_channels: int = 256, min_stride: int = 1):
        super().__init__()
        specs = [*specs, (specs[-1][0], specs[-1][1] * 2)]
        self.skip = sum(s < min_stride for _, s in specs[:-2])
        specs = specs[self.skip :]
        self.strides = tuple(s for _, s in specs)
        self.out_channels = out_channels
        self.outputs = nn.ModuleList(output_convs(c, out_channels) for c, _ in specs)

    def forward(self, maps: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        levels = [*maps, F.max_pool2d(maps[-1], 2, ceil_mode=True)][self.skip :]
        return {level_name(s): conv(y) for s, conv, y in zip(self.strides, self.outputs, levels)}


class FeaturePyramid(nn.Module):
    """An encoder + its neck: images [B, C, H, W] -> {"p<k>": [B, out_channels, H/2^k, W/2^k]}, finest
    first. `maps(images)` is the encoder's part (freeze it, cache it), `neck(maps)` the trainable part."""

    def __init__(self, encoder: nn.Module, neck: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.neck = neck
        self.strides = neck.strides
        self.out_channels = neck.out_channels

    def maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        return encoder_maps(self.encoder, images)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.neck(self.maps(images))


def build_neck(encoder: nn.Module, out_channels: int = 256, min_stride: int = 1) -> nn.Module:
    """ViTDet's simple pyramid for an encoder with one stride, ConvMAE's native one for a hierarchy."""
    specs = map_specs(encoder)
    if len(specs) == 1:
        channels, stride = specs[0]
        return SimpleFeaturePyramid(channels, stride, out_channels, min_stride)
    if len(specs) != 3:
        raise ValueError(f"expected 1 (plain ViT) or 3 (ConvMAE) feature strides, got {specs}")
    return ConvPyramidNeck(specs, out_channels, min_stride)


def build_pyramid(encoder: nn.Module, out_channels: int = 256, min_stride: int = 1) -> FeaturePyramid:
    """A feature pyramid over any encoder with timm's feature contract (mimkit's ViT and ConvViT, or
    `PixelEncoder`). Returns {"p<k>": map} for 4 levels (fewer when min_stride leaves out fine ones, never
    the encoder's own stride and the one above it); see the module doc."""
    if not hasattr(encoder, "forward_intermediates") or not hasattr(encoder, "feature_info"):
        raise ValueError(
            f"{type(encoder).__name__} has no forward_intermediates / feature_info; pass a mimkit encoder "
            "(model.encoder) or a module following timm's feature contract"
        )
    return FeaturePyramid(encoder, build_neck(encoder, out_channels, min_stride))


class PixelEncoder(nn.Module):
    """The raw-pixel baseline as an encoder: patchified pixels [B, p*p*C, H/p, W/p] as its only feature
    (channel order within a patch: row, column, channel, as `mimkit.targets.patchify`). Nothing to train;
    a head on it shows what the task needs beyond the pixels."""

    num_prefix_tokens = 0

    def __init__(self, patch_size: int, in_chans: int = 1):
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = patch_size * patch_size * in_chans
        self.blocks = nn.ModuleList()
        self.feature_info = [{"num_chs": self.embed_dim, "reduction": patch_size, "module": "pixels"}]

    def forward_intermediates(
        self, x: torch.Tensor, indices=None, norm: bool = False, output_fmt: str = "NCHW",
        intermediates_only: bool = False, **_: object,
    ) -> list | tuple[torch.Tensor, list]:  # fmt: skip
        B, C, H, W = x.shape
        p = self.patch_size
        pixels = (
            x.reshape(B, C, H // p, p, W // p, p)
            .permute(0, 3, 5, 1, 2, 4)
            .reshape(B, p * p * C, H // p, W // p)
        )
        if output_fmt == "NLC":
            pixels = pixels.flatten(2).transpose(1, 2)
        if intermediates_only:
            return [pixels]
        return pixels.flatten(2).transpose(1, 2), [pixels]


def encoder_at_size(model: Any, img_size: int | tuple[int, int]) -> nn.Module:
    """The encoder of a method model (`mimkit.create_model` / `mimkit.load`) for images of `img_size`.

    ConvMAE takes any size divisible by its stride as it is. A ViT is rebuilt at the new size with the same
    weights; its position embedding is the method's fixed sin-cos table of the new grid when the model's
    table is that function (mimkit never trains it), otherwise the model's table resized bicubically (as
    timm and detectron2 do for learned tables)."""
    from .interop.export import resize_pos_embed
    from .layers.patch_embed import to_2tuple
    from .registry import create_model

    encoder = model.encoder
    if not hasattr(encoder, "patch_embed") or tuple(encoder.patch_embed.img_size) == to_2tuple(img_size):
        return encoder
    config = dataclasses.asdict(model.config)
    old: Any = as_method(create_model(model.model_name, **config)).encoder  # a ViT: pos_embed, grid_size
    new: Any = as_method(
        create_model(model.model_name, **{**config, "img_size": to_2tuple(img_size)})
    ).encoder
    state = {k: v for k, v in encoder.state_dict().items()}
    if torch.allclose(state["pos_embed"], old.pos_embed, atol=1e-6):
        state["pos_embed"] = new.pos_embed.detach().clone()
    else:
        state["pos_embed"] = resize_pos_embed(
            state["pos_embed"], old.grid_size, new.grid_size, encoder.num_prefix_tokens
        )
    new.load_state_dict(state, strict=True)
    return new.eval()


# ------------------------------------------------------------------------- weights for detection / segmentation


def _vit_state_dict(encoder: Any) -> dict[str, torch.Tensor]:
    if not hasattr(encoder, "cls_token"):
        raise ValueError(
            f"{type(encoder).__name__} is not a plain ViT (MAE / CAE encoder); ConvMAE's conv stages have no "
            "counterpart in ViTDet's or mmsegmentation's ViT"
        )
    return {k: v.detach().clone() for k, v in encoder.state_dict().items()}


def _full_qkv_bias(sd: dict[str, torch.Tensor], prefix: str) -> torch.Tensor | None:
    """qkv bias of one block: MAE's as it is; CAE's q_bias / v_bias with a zero key bias in the middle. A key
    bias adds the same q.b_k to every logit of a query row, so softmax makes any key bias irrelevant: a zero
    one is exact."""
    if prefix + "attn.qkv.bias" in sd:
        return sd.pop(prefix + "attn.qkv.bias")
    if prefix + "attn.q_bias" in sd:
        q, v = sd.pop(prefix + "attn.q_bias"), sd.pop(prefix + "attn.v_bias")
        return torch.cat([q, torch.zeros_like(q), v])
    return None


def to_mmseg_vit(encoder: Encoder) -> dict[str, torch.Tensor]:
    """A mimkit ViT encoder (MAE or CAE) as mmsegmentation's `MAE` backbone names (`backbone.` prefix not
    included): patch_embed.projection, layers.N.{ln1, attn.qkv (full bias), attn.proj, gamma_1, ln2,
    ffn.layers.0.0, ffn.layers.1, gamma_2}, cls_token, pos_embed. Layer scales become gamma_1 / gamma_2 (ones
    for MAE, which has none); the relative position bias tables of that backbone are not included (they
    start at zero and so change nothing); the final norm is dropped (mmseg's MAE runs with final_norm=False).
    See docs/dense.md for the config fields that make the features identical."""
    sd = _vit_state_dict(encoder)
    out = {"cls_token": sd.pop("cls_token"), "pos_embed": sd.pop("pos_embed")}
    out["patch_embed.projection.weight"] = sd.pop("patch_embed.proj.weight")
    out["patch_embed.projection.bias"] = sd.pop("patch_embed.proj.bias")
    names = {"norm1": "ln1", "norm2": "ln2", "attn.qkv": "attn.qkv", "attn.proj": "attn.proj",
             "mlp.fc1": "ffn.layers.0.0", "mlp.fc2": "ffn.layers.1"}  # fmt: skip
    D = encoder.embed_dim
    for i in range(encoder.num_layers):
        src, dst = f"blocks.{i}.", f"layers.{i}."
        bias = _full_qkv_bias(sd, src)
        if bias is not None:
            out[dst + "attn.qkv.bias"] = bias
        for a, b in names.items():
            for kind in ("weight", "bias"):
                if f"{src}{a}.{kind}" in sd:
                    out[f"{dst}{b}.{kind}"] = sd.pop(f"{src}{a}.{kind}")
        out[dst + "gamma_1"] = sd.pop(src + "ls1.gamma", torch.ones(D))
        out[dst + "gamma_2"] = sd.pop(src + "ls2.gamma", torch.ones(D))
    sd.pop("norm.weight", None), sd.pop("norm.bias", None)
    if sd:
        raise ValueError(f"to_mmseg_vit: keys with no mmseg counterpart: {sorted(sd)}")
    return out


def to_detectron2_vit(encoder: Encoder) -> dict[str, torch.Tensor]:
    """A mimkit ViT encoder (MAE or CAE) as detectron2 ViTDet's `ViT` names (prefix `backbone.net.` for a
    whole-model checkpoint): patch_embed.proj, pos_embed (class-token row kept: pretrain_use_cls_token=True),
    blocks.N.{norm1, attn.qkv (full bias), attn.proj, norm2, mlp.fc1, mlp.fc2}. ViTDet's ViT has no layer
    scale: CAE's gamma_1 / gamma_2 are folded into attn.proj / mlp.fc2 (gamma * (W x + b) = (gamma W) x +
    gamma b, exact). No cls_token (ViTDet drops it) and no final norm (its pyramid reads the last block).
    rel_pos_h / rel_pos_w (use_rel_pos=True) are not included: detectron2 initialises them at zero."""
    sd = _vit_state_dict(encoder)
    sd.pop("cls_token")
    sd.pop("norm.weight", None), sd.pop("norm.bias", None)
    out = {}
    for i in range(encoder.num_layers):
        p = f"blocks.{i}."
        bias = _full_qkv_bias(sd, p)
        if bias is not None:
            sd[p + "attn.qkv.bias"] = bias
        for gamma, linear in (("ls1.gamma", "attn.proj"), ("ls2.gamma", "mlp.fc2")):
            g = sd.pop(p + gamma, None)
            if g is not None:
                sd[f"{p}{linear}.weight"] = sd[f"{p}{linear}.weight"] * g[:, None]
                sd[f"{p}{linear}.bias"] = sd[f"{p}{linear}.bias"] * g
    out.update(sd)
    return out
