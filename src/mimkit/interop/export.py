"""Export a mimkit checkpoint: the encoder for timm, a Hugging Face ViTMAE directory, or plain safetensors.

- timm: `<out>.safetensors` with timm key names (ViT for MAE, BEiT for CAE) and `<out>.json` holding the
  `timm.create_model` name and keyword arguments; load it offline with
  `timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), num_classes=0, **kwargs)`.
- hf: a directory with `config.json` + `model.safetensors` (ViTMAEForPreTraining, Hugging Face's on-disk
  names) that `ViTMAEModel.from_pretrained` and `ViTMAEForPreTraining.from_pretrained` load. MAE only.
- safetensors: the full model state dict (or the encoder alone) plus `<out>.json` with the mimkit config;
  the config is also stored in the file's metadata.

With `img_size` different from the training resolution, the position embeddings are resized by bicubic
interpolation over the patch grid; class-token rows are kept as they are.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.checkpoint import load_checkpoint, model_from_checkpoint
from ..layers.patch_embed import to_2tuple

FORMATS = ("timm", "hf", "safetensors")
_TIMM_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}


def resize_pos_embed(
    pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], num_prefix: int = 1
) -> torch.Tensor:
    """[1, prefix + h*w, D] -> [1, prefix + H*W, D]: bicubic over the grid, prefix (class) rows unchanged."""
    if tuple(old_grid) == tuple(new_grid):
        return pos
    prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
    D = grid.shape[-1]
    grid = grid.reshape(1, *old_grid, D).permute(0, 3, 1, 2).float()  # [1, D, h, w]
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, D).to(pos.dtype)  # [1, H*W, D]
    return torch.cat([prefix, grid], dim=1)


def _load_model(checkpoint: str | os.PathLike | dict | nn.Module) -> nn.Module:
    if isinstance(checkpoint, nn.Module):
        return checkpoint
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    return model_from_checkpoint(ckpt).eval()


def _new_grid(model: nn.Module, img_size: Any) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(old grid, new grid, new image size) for the encoder's patch grid."""
    pe = model.encoder.patch_embed
    new_img = to_2tuple(img_size) if img_size is not None else tuple(pe.img_size)
    p = pe.patch_size
    if new_img[0] % p[0] or new_img[1] % p[1]:
        raise ValueError(f"--img-size {new_img} is not divisible by the patch size {p}")
    return tuple(pe.grid_size), (new_img[0] // p[0], new_img[1] // p[1]), new_img


def encoder_state_dict(model: nn.Module, img_size: Any = None) -> dict[str, torch.Tensor]:
    """The encoder's state dict (timm ViT names), position embedding resized to `img_size` if given."""
    sd = {k: v.detach().clone().contiguous() for k, v in model.encoder.state_dict().items()}
    if img_size is not None and not hasattr(model.encoder, "patch_embed"):
        raise ValueError(
            f"--img-size is not supported for {getattr(model, 'method', 'this')} encoders: they take any image "
            "size divisible by the patch size at run time; export without --img-size"
        )
    if "pos_embed" in sd and img_size is not None:
        old, new, _ = _new_grid(model, img_size)
        sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], old, new, model.encoder.num_prefix_tokens)
    return sd


def timm_spec(model: nn.Module, img_size: Any = None) -> tuple[str, dict[str, Any]]:
    """(timm model name, create_model kwargs) for this model's encoder."""
    method = getattr(model, "method", None)
    c = model.config
    if method not in ("mae", "cae"):
        raise ValueError(f"no timm architecture matches a {method} encoder; use --format safetensors instead")
    _, _, new_img = _new_grid(model, img_size)
    size = _TIMM_SIZES.get(c.embed_dim, "base")
    family = "vit" if method == "mae" else "beit"
    name = f"{family}_{size}_patch16_224"
    if method == "mae" and size == "huge":
        name = "vit_huge_patch14_224"
    import timm

    if not timm.is_model(name):
        name = f"{family}_base_patch16_224"  # the kwargs below set the actual sizes
    kwargs: dict[str, Any] = dict(
        img_size=new_img[0] if new_img[0] == new_img[1] else list(new_img),
        patch_size=c.patch_size,
        in_chans=c.in_chans,
        embed_dim=c.embed_dim,
        depth=c.depth,
        num_heads=c.num_heads,
        mlp_ratio=c.mlp_ratio,
    )
    if method == "mae":
        kwargs["global_pool"] = "token"
    else:
        kwargs.update(use_abs_pos_emb=True, use_rel_pos_bias=False, global_pool="token")
        kwargs["init_values"] = c.layer_scale_init
    return name, kwargs


def export_timm(checkpoint: Any, out: str | os.PathLike, img_size: Any = None) -> dict[str, Any]:
    """Write `<out>.safetensors` (timm names) and `<out>.json`; returns the JSON description."""
    from safetensors.torch import save_file

    model = _load_model(checkpoint)
    name, kwargs = timm_spec(model, img_size)
    sd = encoder_state_dict(model, img_size)
    if model.method == "cae":
        from ..methods.cae import cae_encoder_to_timm_beit

        sd = cae_encoder_to_timm_beit(sd)
    path = Path(out).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"format": "pt"})
    info = {
        "timm_name": name,
        "timm_kwargs": kwargs,
        "file": str(path),
        "usage": f"timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay=dict(file={str(path)!r}), "
        f"num_classes=0, **timm_kwargs)",
    }
    path.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def export_hf(checkpoint: Any, out_dir: str | os.PathLike, img_size: Any = None) -> Path:
    """Write a Hugging Face ViTMAE directory (config.json + model.safetensors) for an MAE checkpoint."""
    from safetensors.torch import save_file

    from .hf import hf_config_from_mimkit, mae_to_hf_state_dict

    model = _load_model(checkpoint)
    if getattr(model, "method", None) != "mae":
        raise ValueError(
            f"Hugging Face ViTMAE holds MAE models only, not {getattr(model, 'method', '?')}; "
            "use --format timm or --format safetensors"
        )
    old, new, new_img = _new_grid(model, img_size)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    for key in ("encoder.pos_embed", "decoder_pos_embed"):
        sd[key] = resize_pos_embed(sd[key], old, new, 1)
    config = dataclasses.replace(model.config, img_size=new_img, mask_kind="random")  # HF: random only
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_config_from_mimkit(config).save_pretrained(str(out_dir))
    save_file(
        mae_to_hf_state_dict(sd, "legacy"), str(out_dir / "model.safetensors"), metadata={"format": "pt"}
    )
    return out_dir


def export_safetensors(
    checkpoint: Any, out: str | os.PathLike, img_size: Any = None, encoder_only: bool = False
) -> Path:
    """Write `<out>.safetensors` (full model or encoder) and `<out>.json` (mimkit config)."""
    from safetensors.torch import save_file

    model = _load_model(checkpoint)
    if encoder_only:
        sd = encoder_state_dict(model, img_size)
    else:
        sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        if img_size is not None:
            encoder_state_dict(model, img_size)  # validates that this encoder can be resized
            old, new, _ = _new_grid(model, img_size)
            sd["encoder.pos_embed"] = resize_pos_embed(sd["encoder.pos_embed"], old, new, 1)
            if "decoder_pos_embed" in sd:
                prefix = sd["decoder_pos_embed"].shape[1] - old[0] * old[1]
                sd["decoder_pos_embed"] = resize_pos_embed(sd["decoder_pos_embed"], old, new, prefix)
    config = dataclasses.asdict(model.config)
    if img_size is not None:
        config["img_size"] = list(_new_grid(model, img_size)[2])
    meta = {
        "format": "mimkit/1",
        "model_name": getattr(model, "model_name", None),
        "method": getattr(model, "method", None),
        "model_config": config,
        "contents": "encoder" if encoder_only else "model",
    }
    path = Path(out).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"format": "pt", "mimkit": json.dumps(meta)})
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def export(checkpoint: Any, fmt: str, out: str | os.PathLike, img_size: Any = None, **kw: Any) -> Any:
    """Dispatch to `export_timm` / `export_hf` / `export_safetensors`."""
    if fmt == "timm":
        return export_timm(checkpoint, out, img_size)
    if fmt == "hf":
        return export_hf(checkpoint, out, img_size)
    if fmt == "safetensors":
        return export_safetensors(checkpoint, out, img_size, **kw)
    raise ValueError(f"unknown export format {fmt!r}; choose one of {FORMATS}")
