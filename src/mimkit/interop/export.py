"""Export a mimkit model: the encoder for timm, a Hugging Face ViTMAE directory, or plain safetensors.

Every export carries the preprocessing the model was trained with (input size, mean, std, bicubic
resizing, centre-crop fraction), so a downstream user feeds it images the way it saw them.

- timm: `<out>.safetensors` with timm key names (ViT for MAE, BEiT for CAE) and `<out>.json` holding the
  `timm.create_model` name, keyword arguments and `pretrained_cfg_overlay` (file + preprocessing); the file
  path is absolute (works from any directory) and `load_timm(json)` also finds it after the pair is moved:
  `timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0, **kwargs)`.
- hf: a directory with `config.json` + `model.safetensors` (ViTMAEForPreTraining, Hugging Face's on-disk
  names), `preprocessor_config.json` (so `AutoImageProcessor.from_pretrained(dir)` works), a model card
  `README.md` (method, data, steps, probe results found beside the checkpoint) and `mimkit.json` (so
  `mimkit.load(dir)` gives back the exact preset). MAE only: ViTMAE has no layer scale or conv stages.
- safetensors: the full model state dict (or the encoder alone, or a fine-tuned classifier) plus
  `<out>.json` with the mimkit config and preprocessing; the same JSON is stored in the file's metadata.
  This is the form every method (ConvMAE included) and the classifier take; `mimkit.load` reads it.

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

from ..engine.checkpoint import save_safetensors as _write_safetensors
from ..layers.patch_embed import to_2tuple
from .loading import Weights, build_method_model, display_name, preprocessing, read_weights

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


def _load(checkpoint: str | os.PathLike | dict | nn.Module) -> tuple[Any, Weights | None, Path | None]:
    """(method model in eval mode, what was read, the file it came from) for any mimkit file or object."""
    if isinstance(checkpoint, nn.Module):
        return checkpoint, None, None
    if isinstance(checkpoint, dict):
        weights = Weights("model", checkpoint["model_name"], checkpoint["model_config"], checkpoint["model"],
                          {k: v for k, v in checkpoint.items() if k in ("config", "step", "imported_from")})  # fmt: skip
        return build_method_model(weights), weights, None
    weights = read_weights(checkpoint)
    return build_method_model(weights), weights, Path(checkpoint)


def _preprocessing(model: Any, weights: Weights | None, img_size: Any = None) -> dict[str, Any]:
    """The model's preprocessing (see `loading.preprocessing`), at the export resolution."""
    config = dataclasses.asdict(model.config)
    if img_size is not None:
        config["img_size"] = list(to_2tuple(img_size))
    if weights is not None and weights.meta.get("preprocessing") and img_size is None:
        return dict(weights.meta["preprocessing"])
    data = ((weights.meta.get("config") or {}).get("data") if weights is not None else None) or None
    return preprocessing(config, data)


def _refuse_classifier(weights: Weights | None, fmt: str) -> None:
    if weights is not None and weights.kind == "classifier":
        raise ValueError(
            f"a fine-tuned classifier does not export as --format {fmt}: its head pools the tokens after the "
            "encoder's final norm and normalises again (norm -> mean -> fc_norm -> linear), which neither timm's "
            "ViT nor Hugging Face's ViTMAE can express. Use --format safetensors (mimkit.load reads it back, "
            "class names and preprocessing included), or export the encoder alone with --format timm from the "
            "pretraining checkpoint"
        )


def _new_grid(model: Any, img_size: Any) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(old grid, new grid, new image size) for the encoder's patch grid."""
    pe = model.encoder.patch_embed
    new_img = to_2tuple(img_size) if img_size is not None else tuple(pe.img_size)
    p = pe.patch_size
    if new_img[0] % p[0] or new_img[1] % p[1]:
        raise ValueError(f"--img-size {new_img} is not divisible by the patch size {p}")
    return tuple(pe.grid_size), (new_img[0] // p[0], new_img[1] // p[1]), new_img


def encoder_state_dict(model: Any, img_size: Any = None) -> dict[str, torch.Tensor]:
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


def timm_spec(model: Any, img_size: Any = None) -> tuple[str, dict[str, Any]]:
    """(timm model name, create_model kwargs) for this model's encoder."""
    method = getattr(model, "method", None)
    c = model.config
    if method not in ("mae", "cae"):
        raise ValueError(
            f"timm has no architecture for a {method} encoder (ConvMAE's conv stages are not in timm); export "
            "it with `mimkit export --format safetensors --checkpoint CKPT --out NAME [--encoder-only]` and load "
            "it with mimkit.load('NAME.safetensors'), or probe it directly with `mimkit probe`"
        )
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

    model, weights, _ = _load(checkpoint)
    _refuse_classifier(weights, "timm")
    name, kwargs = timm_spec(model, img_size)
    sd = encoder_state_dict(model, img_size)
    if model.method == "cae":
        from .layouts import cae_encoder_to_timm_beit

        sd = cae_encoder_to_timm_beit(sd)
    path = Path(out).with_suffix(".safetensors").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    prep = _preprocessing(model, weights, img_size)
    config = dataclasses.asdict(model.config)
    if img_size is not None:
        config["img_size"] = list(_new_grid(model, img_size)[2])
    model_name = getattr(model, "model_name", None) or (weights.model_name if weights else None)
    mimkit_meta = {"model_name": model_name, "model_config": config, "preprocessing": prep,
                   "contents": "timm-vit" if model.method == "mae" else "timm-beit"}  # fmt: skip
    save_file(sd, str(path), metadata={"format": "pt", "mimkit": json.dumps(mimkit_meta, default=list)})
    overlay = {
        "file": str(path),
        "num_classes": 0,
        "input_size": prep["input_size"],
        "mean": prep["mean"],
        "std": prep["std"],
        "interpolation": prep["interpolation"],
        "crop_pct": prep["crop_pct"],
        "crop_mode": prep["crop_mode"],
    }
    info = {
        "name": display_name(model_name, config) if model_name else name,
        "timm_name": name,
        "timm_kwargs": kwargs,
        "pretrained_cfg_overlay": overlay,
        "file": str(path),
        "file_name": path.name,
        "note": f"{name} is the timm architecture family; timm_kwargs set the actual sizes. The overlay "
        "carries the preprocessing: timm.data.resolve_data_config(model=model) gives it back",
        "usage": f"timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay=info['pretrained_cfg_overlay'], "
        f"num_classes=0, **info['timm_kwargs'])   # or mimkit.interop.export.load_timm({str(path.with_suffix('.json'))!r})",
    }
    path.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def load_timm(json_path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """Build the timm model of a `export --format timm` JSON (kwargs passed on, e.g. num_classes=10).

    The weights file is looked for beside the JSON first, then at its recorded absolute path, so the pair
    can be moved together."""
    import timm

    json_path = Path(json_path)
    info = json.loads(json_path.read_text())
    file = json_path.parent / info.get("file_name", Path(info["file"]).name)
    if not file.is_file():
        file = Path(info["file"])
    overlay = {**info.get("pretrained_cfg_overlay", {}), "file": str(file)}
    args = {**info["timm_kwargs"], "num_classes": 0, **kwargs}
    return timm.create_model(
        info["timm_name"], pretrained=True, pretrained_cfg_overlay=overlay, **args
    ).eval()


def _processor_config(prep: dict[str, Any]) -> dict[str, Any]:
    """A Hugging Face image processor config doing mimkit's eval preprocessing: shortest side resized to
    size / crop_pct (bicubic), centre crop to size, rescale to [0, 1], normalise."""
    c, h, w = prep["input_size"]
    common = {"do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
              "do_normalize": True, "image_mean": prep["mean"], "image_std": prep["std"]}  # fmt: skip
    if h == w and h < 384:  # ConvNext's processor: shortest edge / crop_pct, then a centre crop
        return {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": h},
                "crop_pct": prep["crop_pct"], **common}  # fmt: skip
    return {"image_processor_type": "ViTImageProcessor", "size": {"height": h, "width": w}, **common}


def _results_beside(source: Path | None) -> list[dict[str, Any]]:
    """Probe / fine-tune results written next to the checkpoint (`<run>/probe_*/result.json`, ...)."""
    if source is None:
        return []
    found = []
    for path in sorted(source.parent.glob("*/result.json")):
        try:
            r = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if "accuracy" in r and (r.get("model_key") or {}).get("init") != "random":
            found.append({"protocol": r.get("protocol", path.parent.name), "accuracy": r["accuracy"],
                          "num_test": r.get("num_test"), "split": r.get("split"), "folder": path.parent.name})  # fmt: skip
    return found


def model_card(model: Any, weights: Weights | None, source: Path | None, prep: dict[str, Any]) -> str:
    """README.md for an export: what it is, what it was trained on, how long, how it scored, how to load it."""
    from ..data.folder import describe_split

    meta = weights.meta if weights is not None else {}
    cfg = meta.get("config") or {}
    data = cfg.get("data") or {}
    name = display_name(getattr(model, "model_name", "?"), dataclasses.asdict(model.config))
    method = {
        "mae": "MAE (He et al., 2021)",
        "cae": "CAE (Chen et al.)",
        "convmae": "ConvMAE (Gao et al., 2022)",
    }
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-feature-extraction",
        "tags: [mimkit, masked-image-modeling, vit-mae]",
        "---",
        f"# {name}",
        "",
        f"A vision encoder pretrained with {method.get(model.method, model.method)} masked image modeling, "
        "exported by mimkit.",
        "",
        "## Training",
        "",
        f"- method: `{model.method}`, mimkit preset `{getattr(model, 'model_name', '?')}` (config in `mimkit.json`)",
        f"- input: {prep['input_size'][0]} channel(s), {prep['input_size'][1]}x{prep['input_size'][2]} px",
    ]
    if data:
        where = f"`{data.get('source')}`" + (f" at `{data['path']}`" if data.get("path") else "")
        lines.append(f"- data: {where}")
    if meta.get("step") is not None:
        lines.append(f"- optimizer steps: {meta['step']} (epoch {meta.get('epoch', '?')})")
    if meta.get("imported_from"):
        lines.append(f"- imported from: `{meta['imported_from'].get('path', meta['imported_from'])}`")
    results = _results_beside(source)
    lines += ["", "## Evaluation", ""]
    if results:
        for r in results:
            split = f" — {describe_split(r['split'])}" if r.get("split") else ""
            lines.append(
                f"- {r['protocol']}: {100 * r['accuracy']:.2f}% top-1 on {r['num_test']} test images{split}"
            )
    else:
        lines.append("No probe results were found beside the checkpoint (`mimkit probe` writes them).")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoImageProcessor, AutoModel",
        "processor = AutoImageProcessor.from_pretrained(path)   # resize, crop and normalise as in training",
        "model = AutoModel.from_pretrained(path, mask_ratio=0.0)  # no masking: every patch is seen",
        "features = model(**processor(images, return_tensors='pt')).last_hidden_state[:, 0]  # class token",
        "```",
        "",
        f"Preprocessing: bicubic resize of the shorter side to {prep['input_size'][1]} / {prep['crop_pct']}, "
        f"centre crop, mean {prep['mean']}, std {prep['std']}."
        + (" Convert images to grayscale first." if prep["input_size"][0] == 1 else ""),
        "`mimkit.load(path)` gives back the mimkit model.",
        "",
    ]
    return "\n".join(lines)


def export_hf(checkpoint: Any, out_dir: str | os.PathLike, img_size: Any = None) -> Path:
    """Write a Hugging Face ViTMAE directory for an MAE model: config.json, model.safetensors,
    preprocessor_config.json, README.md (model card) and mimkit.json."""
    from safetensors.torch import save_file

    from .hf import hf_config_from_mimkit, mae_to_hf_state_dict

    model, weights, source = _load(checkpoint)
    _refuse_classifier(weights, "hf")
    method = getattr(model, "method", "?")
    if method != "mae":
        other = (
            "--format timm (a timm BEiT) or --format safetensors"
            if method == "cae"
            else "--format safetensors"
        )
        raise ValueError(
            f"Hugging Face ViTMAE holds MAE models only, not {method}; use {other} (mimkit.load reads it back)"
        )
    old, new, new_img = _new_grid(model, img_size)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    encoder_only = weights is not None and weights.kind == "encoder"
    if encoder_only:  # the decoder was never trained: write the encoder alone (ViTMAEModel loads it)
        sd = {k: v for k, v in sd.items() if k.startswith("encoder.")}
    for key in ("encoder.pos_embed", "decoder_pos_embed"):
        if key in sd:
            sd[key] = resize_pos_embed(sd[key], old, new, 1)
    config = dataclasses.replace(model.config, img_size=new_img, mask_kind="random")  # HF: random only
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_config_from_mimkit(config).save_pretrained(str(out_dir))
    save_file(
        mae_to_hf_state_dict(sd, "legacy"), str(out_dir / "model.safetensors"), metadata={"format": "pt"}
    )
    prep = _preprocessing(model, weights, img_size)
    (out_dir / "preprocessor_config.json").write_text(json.dumps(_processor_config(prep), indent=2) + "\n")
    (out_dir / "README.md").write_text(model_card(model, weights, source, prep))
    mimkit_meta = {
        "model_name": getattr(model, "model_name", None),
        "model_config": {**dataclasses.asdict(config), "img_size": list(new_img)},
        "preprocessing": prep,
        "contents": "encoder" if encoder_only else "model",
    }
    (out_dir / "mimkit.json").write_text(json.dumps(mimkit_meta, indent=2, default=list) + "\n")
    return out_dir


def export_safetensors(
    checkpoint: Any, out: str | os.PathLike, img_size: Any = None, encoder_only: bool = False
) -> Path:
    """Write `<out>.safetensors` (full model, encoder, or fine-tuned classifier) and `<out>.json` (mimkit
    config and preprocessing); `mimkit.load` reads the file back."""
    if not isinstance(checkpoint, (nn.Module, dict)):
        read = read_weights(checkpoint)
        if read.kind == "classifier":
            return _export_classifier(read, out, img_size)
    model, weights, _ = _load(checkpoint)
    if weights is not None and weights.kind == "encoder":
        encoder_only = True  # the file never held a trained decoder
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
        "preprocessing": _preprocessing(model, weights, img_size),
    }
    return _write_safetensors(sd, meta, out)


def _export_classifier(weights: Weights, out: str | os.PathLike, img_size: Any = None) -> Path:
    if img_size is not None:
        raise ValueError("--img-size is not supported for a fine-tuned classifier; export it without")
    sd = {k: v.detach().contiguous() for k, v in weights.state_dict.items()}
    meta: dict[str, Any] = {
        "format": "mimkit/1",
        "model_name": weights.model_name,
        "model_config": weights.model_config,
        "contents": "classifier",
        **{
            k: weights.meta[k]
            for k in ("num_classes", "class_names", "preprocessing", "accuracy")
            if k in weights.meta
        },
    }
    return _write_safetensors(sd, meta, out)


def export(checkpoint: Any, fmt: str, out: str | os.PathLike, img_size: Any = None, **kw: Any) -> Any:
    """Dispatch to `export_timm` / `export_hf` / `export_safetensors`."""
    if fmt == "timm":
        return export_timm(checkpoint, out, img_size)
    if fmt == "hf":
        return export_hf(checkpoint, out, img_size)
    if fmt == "safetensors":
        return export_safetensors(checkpoint, out, img_size, **kw)
    raise ValueError(f"unknown export format {fmt!r}; choose one of {FORMATS}")
