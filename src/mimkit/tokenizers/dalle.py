"""The DALL-E d-VAE encoder (the tokenizer of BEiT and CAE), rebuilt from its weight layout.

Layout of OpenAI's `dall_e` encoder state dict (key prefix `blocks.`, or `encoder.blocks.` in some
re-saved copies); every conv stores `w` [out, in, k, k] and `b` [out], padding (k - 1) // 2:

    input                      conv 7x7, in_chans -> n_hid
    group_g (g = 1..G)         block_1..block_N, then `pool` (2x2 max pool) for every group but the last
      block_i                  id_path (1x1 conv, only when widths differ) + post_gain * res_path
        res_path               relu, conv_1 3x3 (-> n_out/4), relu, conv_2 3x3, relu, conv_3 3x3, relu, conv_4 1x1
    output                     relu, conv 1x1 (8 n_hid -> vocab 8192)

post_gain = 1 / (G * N)^2. Widths per group: n_hid x (1, 2, 4, 8). Tokens are the argmax over the vocab of
the output logits. Inputs are [0, 1] pixels mapped to 0.8 x + 0.1, at half the model's resolution
(the 112-px second view of a 224-px crop): a 224/16 CAE gets a 14 x 14 token grid.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.patch_embed import to_2tuple

LOGIT_EPS = 0.1  # map_pixels: (1 - 2 eps) x + eps


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels -> the d-VAE's input range: 0.8 x + 0.1."""
    return (1 - 2 * LOGIT_EPS) * x + LOGIT_EPS


class _Conv(nn.Module):
    """Conv with the dall_e parameter names `w` and `b` and 'same' padding."""

    def __init__(self, n_in: int, n_out: int, kernel: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n_out, n_in, kernel, kernel))
        self.b = nn.Parameter(torch.zeros(n_out))
        self.padding = (kernel - 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=self.padding)


class _EncoderBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, post_gain: float):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = post_gain
        self.id_path = _Conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.ModuleDict(
            {
                "conv_1": _Conv(n_in, n_hid, 3),
                "conv_2": _Conv(n_hid, n_hid, 3),
                "conv_3": _Conv(n_hid, n_hid, 3),
                "conv_4": _Conv(n_hid, n_out, 1),
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for conv in self.res_path.values():
            h = conv(F.relu(h))
        return self.id_path(x) + self.post_gain * h


class DalleEncoder(nn.Module):
    """d-VAE encoder with the dall_e key layout under `blocks.`: [B, C, h, w] in 0.8x+0.1 range ->
    logits [B, vocab, h/2^(G-1), w/2^(G-1)]."""

    def __init__(self, in_chans: int = 3, n_hid: int = 256, group_count: int = 4, n_blk_per_group: int = 2,
                 vocab_size: int = 8192):  # fmt: skip
        super().__init__()
        self.group_count = group_count
        post_gain = 1.0 / (group_count * n_blk_per_group) ** 2
        blocks = nn.ModuleDict({"input": _Conv(in_chans, n_hid, 7)})
        width = n_hid
        for g in range(group_count):
            out = n_hid * 2**g
            group = nn.ModuleDict()
            for i in range(n_blk_per_group):
                group[f"block_{i + 1}"] = _EncoderBlock(width if i == 0 else out, out, post_gain)
            width = out
            blocks[f"group_{g + 1}"] = group
        blocks["output"] = nn.ModuleDict({"conv": _Conv(width, vocab_size, 1)})
        self.blocks = blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks: Any = self.blocks  # nested ModuleDicts, indexed by the authors' names
        x = blocks["input"](x)
        for g in range(self.group_count):
            for block in blocks[f"group_{g + 1}"].values():
                x = block(x)
            if g < self.group_count - 1:
                x = F.max_pool2d(x, 2)
        return blocks["output"]["conv"](F.relu(x))

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> DalleEncoder:
        """Infer the sizes from dall_e-layout weights (prefix `blocks.` or `encoder.blocks.`) and load them."""
        sd = {
            k.removeprefix("encoder."): v
            for k, v in state_dict.items()
            if k.startswith(("blocks.", "encoder.blocks."))
        }
        if "blocks.input.w" not in sd or "blocks.output.conv.w" not in sd:
            raise ValueError(
                "not a DALL-E d-VAE encoder state dict: expected keys blocks.input.w and blocks.output.conv.w "
                "(prefix 'encoder.' allowed)"
            )
        groups = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.group_(\d+)\.", k))}
        per_group = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.group_1\.block_(\d+)\.", k))}
        n_hid, in_chans = sd["blocks.input.w"].shape[:2]
        enc = cls(in_chans, n_hid, len(groups), len(per_group), sd["blocks.output.conv.w"].shape[0])
        enc.load_state_dict(sd, strict=True)
        return enc


class DalleTokenizer(nn.Module):
    """Token ids from the model's input batch with the DALL-E encoder.

    `encode(images)`: images normalised with `input_mean`/`input_std` (the data pipeline's stats, ImageNet
    by default) -> [0, 1] pixels -> resized to half resolution (the 112-px view of a 224 crop; bicubic with
    antialias, where BEiT's loader used Lanczos on the crop) -> 0.8 x + 0.1 -> argmax token [B, L].
    """

    kind = "dalle"
    input_mean: torch.Tensor  # buffers [1, C, 1, 1], declared for the type checker
    input_std: torch.Tensor

    def __init__(self, encoder: DalleEncoder, input_mean: Sequence[float] = (0.485, 0.456, 0.406),
                 input_std: Sequence[float] = (0.229, 0.224, 0.225)):  # fmt: skip
        super().__init__()
        self.encoder = encoder
        self.register_buffer("input_mean", torch.tensor(input_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(input_std).view(1, -1, 1, 1), persistent=False)

    @property
    def codebook_size(self) -> int:
        blocks: Any = self.encoder.blocks
        return blocks["output"]["conv"].w.shape[0]

    @property
    def downsample(self) -> int:
        return 2 * 2 ** (self.encoder.group_count - 1)  # half-res view, then G-1 poolings

    def grid_size(self, img_size) -> tuple[int, int]:
        h, w = to_2tuple(img_size)
        if h % self.downsample or w % self.downsample:
            raise ValueError(
                f"image size {(h, w)} must be divisible by {self.downsample} for the DALL-E tokenizer"
            )
        return h // self.downsample, w // self.downsample

    def second_view(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised model input [B, C, H, W] -> mapped d-VAE input [B, C, H/2, W/2]."""
        pixels = (images.float() * self.input_std + self.input_mean).clamp(0, 1)
        half = (images.shape[-2] // 2, images.shape[-1] // 2)
        pixels = F.interpolate(pixels, size=half, mode="bicubic", antialias=True, align_corners=False)
        return map_pixels(pixels.clamp(0, 1))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(images.device.type, enabled=False):  # float32 ids whatever the precision
            logits = self.encoder(self.second_view(images))  # [B, vocab, h, w]
        return logits.argmax(dim=1).flatten(1)  # [B, L]
