"""Small typed building blocks shared by every backbone and method."""

from .attention import Attention, attend, set_fused_attention
from .block import Block, compile_blocks, set_selective_checkpointing
from .drop_path import DropPath
from .mlp import LayerScale, Mlp
from .patch_embed import PatchEmbed, to_2tuple
from .pos_embed import sincos_1d, sincos_2d

__all__ = [
    "Attention",
    "Block",
    "DropPath",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "attend",
    "compile_blocks",
    "set_fused_attention",
    "set_selective_checkpointing",
    "sincos_1d",
    "sincos_2d",
    "to_2tuple",
]
