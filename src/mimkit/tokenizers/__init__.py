"""Discrete tokenizers for CAE's token targets: a VQ-VAE trainable on your images, and the DALL-E d-VAE encoder.

Every tokenizer has `encode(images) -> [B, L] long` (images as the model sees them), `codebook_size` and
`grid_size(img_size)`. Files are safetensors with the tokenizer's JSON config in the header metadata
(key "mimkit_tokenizer"), so one file is the whole tokenizer:

    tok = VQTokenizer(VQTokenizerConfig(in_chans=1, patch_size=4, codebook_size=512))
    save_tokenizer(tok, "tok.safetensors")
    tok = load_tokenizer("tok.safetensors")
    ids = tok.encode(images)  # [B, (H/4)*(W/4)]

`load_tokenizer` also reads DALL-E encoder weights (a state dict in the dall_e `blocks.*` layout, saved with
torch.save or safetensors, without mimkit metadata).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .dalle import DalleEncoder, DalleTokenizer, map_pixels
from .vq import VQTokenizer, VQTokenizerConfig, codebook_usage, train_vq_tokenizer

METADATA_KEY = "mimkit_tokenizer"

__all__ = [
    "DalleEncoder",
    "DalleTokenizer",
    "VQTokenizer",
    "VQTokenizerConfig",
    "codebook_usage",
    "load_tokenizer",
    "map_pixels",
    "save_tokenizer",
    "train_vq_tokenizer",
]


def save_tokenizer(tokenizer: nn.Module, path: str | os.PathLike) -> Path:
    """Write `tokenizer` (VQTokenizer or DalleTokenizer) as safetensors with its JSON config in the header."""
    from safetensors.torch import save_file

    if isinstance(tokenizer, VQTokenizer):
        config = tokenizer.config_dict()
    elif isinstance(tokenizer, DalleTokenizer):
        config = {
            "kind": "dalle",
            "input_mean": tokenizer.input_mean.flatten().tolist(),
            "input_std": tokenizer.input_std.flatten().tolist(),
        }
    else:
        raise TypeError(f"cannot save a {type(tokenizer).__name__}; expected VQTokenizer or DalleTokenizer")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in tokenizer.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={METADATA_KEY: json.dumps(config)})
    os.replace(tmp, path)
    return path


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        config = json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else None
        return load_file(str(path)), config
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"could not read {path} as a state dict ({type(err).__name__}). For OpenAI's pickled encoder.pkl, "
            "convert it once where the dall_e package is installed: "
            "torch.save(torch.load('encoder.pkl').state_dict(), 'dalle_encoder.pt')"
        ) from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return obj, None


def load_tokenizer(path: str | os.PathLike, **dalle_kwargs) -> nn.Module:
    """Load a tokenizer saved by `save_tokenizer`, or DALL-E encoder weights (dall_e `blocks.*` layout).

    dalle_kwargs (DALL-E only): input_mean / input_std of the images `encode` will receive.
    The tokenizer is returned in eval mode.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer file {path} not found; train one with `mimkit tokenizer train`")
    state, config = _read(path)
    if config is not None and config.get("kind") == "vq":
        config = {k: v for k, v in config.items() if k != "kind"}
        tok = VQTokenizer(VQTokenizerConfig(**config))
        tok.load_state_dict(state, strict=True)
        return tok.eval()
    if config is not None and config.get("kind") == "dalle":
        dalle_kwargs = {"input_mean": config["input_mean"], "input_std": config["input_std"], **dalle_kwargs}
    return DalleTokenizer(DalleEncoder.from_state_dict(state), **dalle_kwargs).eval()
