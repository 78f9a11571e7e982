"""Import official / Hugging Face checkpoints into mimkit, export mimkit encoders to timm / HF / safetensors.

ckpt = import_checkpoint("mae_visualize_vit_base.pth", source="mae")   # -> mimkit checkpoint dict
export(ckpt, "hf", "exported/vit-mae")                                  # or "timm", "safetensors"
"""

from .export import FORMATS, export, export_hf, export_safetensors, export_timm, resize_pos_embed
from .importers import SOURCES, import_checkpoint, load_weights_file

__all__ = [
    "FORMATS",
    "SOURCES",
    "export",
    "export_hf",
    "export_safetensors",
    "export_timm",
    "import_checkpoint",
    "load_weights_file",
    "resize_pos_embed",
]
