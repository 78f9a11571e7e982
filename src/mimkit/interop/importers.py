"""Import the authors' MAE / CAE / ConvMAE checkpoints and Hugging Face ViTMAE directories as mimkit checkpoints.

Nothing here unpickles arbitrary objects. `.pth` files are read with `torch.load(weights_only=True)`, with
exactly one class allowed beside tensors and plain containers: `argparse.Namespace`, which the official
training scripts store as `ckpt['args']`. Any other pickled object is refused before it is built, so a
malicious file runs nothing. `.safetensors` files hold tensors only.

The model configuration is inferred from tensor shapes (width, depth, patch size, image size, decoder
sizes) and, where present, from the stored training arguments (mask ratio, norm-pix loss). Head counts are
not visible in shapes: the standard ones for the width are assumed (ViT-T/S/B/L/H: 3/6/12/16/16 heads;
otherwise 64 channels per head); pass `num_heads=` / `decoder_num_heads=` to override.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..engine.checkpoint import FORMAT
from ..registry import create_model, list_models

SOURCES = ("mae", "cae", "convmae", "hf")
_STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
_MAE_DECODER_PREFIXES = ("decoder_", "mask_token")


def standard_heads(width: int, head_dim: int = 64) -> int:
    """Head count of the standard ViT of this width (ViT-T/S/B/L/H), else width / head_dim."""
    return _STANDARD_HEADS.get(width, max(1, width // head_dim))


# ---------------------------------------------------------------------------------------------------------
# Safe reading


def load_weights_file(path: str | Path) -> dict[str, Any]:
    """Read a `.safetensors` file, or a torch pickle allowing only tensors, containers and argparse.Namespace.

    Raises ValueError (naming the offending object and the safe alternative) for anything else.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"a pickled `{found.group(1)}`" if found else "pickled objects"
        raise ValueError(
            f"refusing to load {path}: it contains {what} besides tensors and an argparse.Namespace, and "
            f"unpickling it could run arbitrary code ({detail}). If you trust the file, extract just the "
            "weights in a separate Python session (`sd = torch.load(src, weights_only=False)['model']; "
            "safetensors.torch.save_file(sd, 'weights.safetensors')`) and import the .safetensors file."
        ) from e


def _state_dict_and_args(obj: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a loaded official checkpoint into (state dict, training args as a dict)."""
    args = obj.get("args") if isinstance(obj, Mapping) else None
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    for key in ("model", "state_dict", "module"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    sd = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise ValueError("no tensors found in the checkpoint (looked under 'model', 'state_dict', 'module')")
    return sd, args


def _with_decoder_and_recipe(cfg: dict, sd: Mapping[str, torch.Tensor], args: dict) -> dict:
    """Add the MAE-style decoder sizes read off its weights and the recipe flags stored with the weights."""
    if "decoder_embed.weight" in sd:
        Dd = sd["decoder_embed.weight"].shape[0]
        cfg.update(
            decoder_embed_dim=Dd,
            decoder_depth=_count(sd, "decoder_blocks."),
            decoder_num_heads=standard_heads(Dd, 32),
        )
    if "norm_pix_loss" in args:
        cfg["norm_pix_loss"] = bool(args["norm_pix_loss"])
    if "mask_ratio" in args:
        cfg["mask_ratio"] = float(args["mask_ratio"])
    return cfg


def _summarise(keys: list[str], limit: int = 4) -> str:
    """A few key names, one per module prefix (blocks collapse to their first), for one-line messages."""
    seen: dict[str, str] = {}
    for key in keys:
        seen.setdefault(re.sub(r"\.\d+\..*|\.[^.]*$", "", key), key)
    names = list(seen.values())
    return ", ".join(names[:limit]) + (
        f" and {len(keys) - len(names[:limit])} more" if len(keys) > limit else ""
    )


def _count(sd: Mapping[str, Any], prefix: str) -> int:
    ids = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def _img_size(num_tokens: int, stride: int, given: Any) -> Any:
    if given is not None:
        return given
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(
            f"the position embedding has {num_tokens} patches, not a square grid; pass img_size=(H, W)"
        )
    return side * stride


# ---------------------------------------------------------------------------------------------------------
# Official MAE


def mae_from_official_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official MAE names (timm ViT encoder at the top level, `decoder_*`, `mask_token`) -> mimkit MAE."""
    out = {}
    for key, value in sd.items():
        if key.startswith(("head.", "fc_norm.")):
            continue  # a fine-tuned classifier head is not part of the pretraining model
        out[key if key.startswith(_MAE_DECODER_PREFIXES) else "encoder." + key] = value
    return out


def _mae_config(sd: Mapping[str, torch.Tensor], args: dict[str, Any], overrides: dict[str, Any]) -> dict:
    D, C, p, _ = sd["encoder.patch_embed.proj.weight"].shape
    cfg: dict[str, Any] = dict(
        patch_size=p,
        in_chans=C,
        embed_dim=D,
        depth=_count(sd, "encoder.blocks."),
        num_heads=standard_heads(D),
        img_size=_img_size(sd["encoder.pos_embed"].shape[1] - 1, p, overrides.get("img_size")),
        mlp_ratio=sd["encoder.blocks.0.mlp.fc1.weight"].shape[0] / D,
    )
    return _with_decoder_and_recipe(cfg, sd, args)


# ---------------------------------------------------------------------------------------------------------
# Official CAE (BEiT-style names)

_CAE_BLOCK = [(".gamma_1", ".ls1.gamma"), (".gamma_2", ".ls2.gamma")]
_CAE_REGRESSOR = [
    (".norm1_q.", ".norm_q."), (".norm1_k.", ".norm_k."), (".norm1_v.", ".norm_v."),
    (".cross_attn.q_bias", ".attn.q.bias"), (".cross_attn.v_bias", ".attn.v.bias"),
    (".cross_attn.", ".attn."), (".gamma_1_cross", ".ls1.gamma"), (".gamma_2_cross", ".ls2.gamma"),
    (".norm2_cross.", ".norm2."), (".mlp_cross.", ".mlp."),
]  # fmt: skip
# (official prefix, mimkit prefix, renames) for both of the authors' layouts: the current one (`regresser.`,
# `decoder.`, `alignment_encoder.`, `rd_pos_embed`) and the older one (`pretext_neck.`, `teacher.`).
_CAE_PREFIXES = [
    ("encoder.", "encoder.", _CAE_BLOCK),
    ("regresser.regressor_blocks.", "regressor_blocks.", _CAE_REGRESSOR),
    ("regresser.norm.", "regressor_norm.", []),
    ("decoder.decoder_blocks.", "decoder_blocks.", _CAE_BLOCK),
    ("decoder.norm.", "decoder_norm.", []),
    ("decoder.head.", "decoder_pred.", []),
    ("pretext_neck.regressor_blocks.", "regressor_blocks.", _CAE_REGRESSOR),
    ("pretext_neck.norm.", "regressor_norm.", []),
    ("pretext_neck.decoder_blocks.", "decoder_blocks.", _CAE_BLOCK),
    ("pretext_neck.norm2.", "decoder_norm.", []),
    ("pretext_neck.head.", "decoder_pred.", []),
    ("mask_token", "mask_token", []),
    ("rd_pos_embed", "rd_pos_embed", []),
]
_CAE_TEACHERS = ("alignment_encoder.", "teacher.")


def cae_from_official_state_dict(
    sd: Mapping[str, torch.Tensor], keep_teacher: bool = False
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official CAE names -> mimkit CAE. Returns (state dict, official keys left out on purpose).

    Both of the authors' layouts: `encoder.*` (BEiT blocks, gamma_1/2 -> ls1/ls2.gamma), the regressor under
    `regresser.regressor_blocks.N` or `pretext_neck.regressor_blocks.N` (norm1_q/k/v, cross_attn.{q,k,v,proj,
    q_bias,v_bias}, gamma_{1,2}_cross, norm2_cross, mlp_cross) -> regressor_blocks.N, `regresser.norm` /
    `pretext_neck.norm` -> regressor_norm, the decoder under `decoder.decoder_blocks` / `pretext_neck.
    decoder_blocks` with `decoder.norm` / `pretext_neck.norm2` -> decoder_norm and `decoder.head` /
    `pretext_neck.head` -> decoder_pred (pixel or token head, kept either way), `rd_pos_embed`, `mask_token`.
    The alignment encoder (`alignment_encoder.*` or `teacher.*`) becomes the EMA teacher with `keep_teacher`;
    at momentum 0 it is a copy of the encoder and is left out. An older file without `rd_pos_embed` gets
    the encoder's table (the authors build both from the same sin-cos function). An encoder saved without
    the `encoder.` prefix (fine-tuning layout) is accepted. Keys of no known layout are returned with the
    dropped ones for the caller to refuse.
    """
    if not any(k.startswith("encoder.") for k in sd):
        sd = {"encoder." + k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm."))}
    if "encoder_to_decoder.weight" in sd:
        raise ValueError(
            "this CAE checkpoint projects the encoder output to a narrower decoder (encoder_to_decoder, CAE v2), "
            "which mimkit's CAE does not have; import its encoder alone with --encoder-only"
        )
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in sd.items():
        teacher = next((t for t in _CAE_TEACHERS if key.startswith(t)), None)
        if teacher is not None:
            if not keep_teacher:
                dropped.append(key)
                continue
            key = "encoder." + key[len(teacher) :]
        for theirs, ours, renames in _CAE_PREFIXES:
            if key.startswith(theirs):
                new = ours + key[len(theirs) :]
                for a, b in renames:
                    new = new.replace(a, b)
                out[("teacher." + new[len("encoder.") :]) if teacher else new] = value
                break
        else:
            dropped.append(key)
    if "encoder.pos_embed" in out:
        out.setdefault("rd_pos_embed", out["encoder.pos_embed"].clone())
    return out, dropped


def _cae_config(sd: Mapping[str, torch.Tensor], args: dict[str, Any], overrides: dict[str, Any]) -> dict:
    D, C, p, _ = sd["encoder.patch_embed.proj.weight"].shape
    heads = standard_heads(D)
    encoder_ls = sd.get("encoder.blocks.0.ls1.gamma")
    cfg: dict[str, Any] = dict(
        patch_size=p,
        in_chans=C,
        embed_dim=D,
        depth=_count(sd, "encoder.blocks."),
        num_heads=heads,
        img_size=_img_size(sd["encoder.pos_embed"].shape[1] - 1, p, overrides.get("img_size")),
        mlp_ratio=sd["encoder.blocks.0.mlp.fc1.weight"].shape[0] / D,
        layer_scale_init=0.1 if encoder_ls is not None else None,
        decoder_layer_scale_init=0.1 if "regressor_blocks.0.ls1.gamma" in sd else None,
        decoder_num_heads=int(args.get("decoder_num_heads", heads)),
        target="pixel",
    )
    if "regressor_blocks.0.norm_q.weight" in sd:
        cfg.update(
            regressor_depth=_count(sd, "regressor_blocks."), decoder_depth=_count(sd, "decoder_blocks.")
        )
    head = sd.get("decoder_pred.weight")
    if head is not None and head.shape[0] != p * p * C:
        # A token head (e.g. the DALL-E tokenizer's 8192 codes): kept; the model needs a tokenizer (set
        # tokenizer_path) or target ids passed to forward before it can compute its loss.
        cfg.update(target="token", vocab_size=int(head.shape[0]))
    # The authors' training arguments: num_mask_patches, drop_path, align_loss_weight, (norm_pix_loss).
    grid = (sd["encoder.pos_embed"].shape[1] - 1) if "num_mask_patches" in args else 0
    if grid:
        cfg["mask_ratio"] = int(args["num_mask_patches"]) / grid
    if "drop_path" in args:
        cfg["drop_path_rate"] = float(args["drop_path"])
    if "align_loss_weight" in args:
        cfg["align_weight"] = float(args["align_loss_weight"])
    if "norm_pix_loss" in args:
        cfg["norm_pix_loss"] = bool(args["norm_pix_loss"])
    return cfg


# ---------------------------------------------------------------------------------------------------------
# Official ConvMAE


def _convmae_config(sd: Mapping[str, torch.Tensor], args: dict[str, Any], overrides: dict[str, Any]) -> dict:
    w = [sd[f"encoder.patch_embed{i}.proj.weight"] for i in (1, 2, 3)]
    strides = tuple(int(t.shape[-1]) for t in w)
    dims = tuple(int(t.shape[0]) for t in w)
    cfg: dict[str, Any] = dict(
        in_chans=int(w[0].shape[1]),
        strides=strides,
        embed_dims=dims,
        depths=tuple(_count(sd, f"encoder.blocks{i}.") for i in (1, 2, 3)),
        num_heads=standard_heads(dims[-1]),
        mlp_ratio=sd["encoder.blocks3.0.mlp.fc1.weight"].shape[0] / dims[-1],
        dw_kernel=int(sd["encoder.blocks1.0.attn.weight"].shape[-1]),
        img_size=_img_size(sd["encoder.pos_embed"].shape[1], math.prod(strides), overrides.get("img_size")),
    )
    return _with_decoder_and_recipe(cfg, sd, args)


# ---------------------------------------------------------------------------------------------------------
# Hugging Face ViTMAE


def load_hf_directory(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, config.json) of a Hugging Face model directory (model.safetensors or pytorch_model.bin)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    config = json.loads((path / "config.json").read_text())
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return dict(load_weights_file(path / name)), config
    if (path / "model.safetensors.index.json").is_file():
        index = json.loads((path / "model.safetensors.index.json").read_text())
        sd: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            sd.update(load_weights_file(path / shard))
        return sd, config
    raise FileNotFoundError(f"{path} has no model.safetensors or pytorch_model.bin")


# ---------------------------------------------------------------------------------------------------------


def _preset_for(method: str, cfg: dict[str, Any], requested: str | None) -> str:
    """A registered preset name for `method` (the requested one, else the closest match by size)."""
    if requested:
        return requested
    names = list_models(f"{method}_*")
    if not names:
        raise ValueError(f"no {method} model is registered")
    from ..registry import model_config

    keys = ("embed_dim", "embed_dims", "depth", "depths", "patch_size", "strides", "img_size")

    def score(name: str) -> int:
        preset = dataclasses.asdict(model_config(name))
        return sum(1 for k in keys if k in cfg and k in preset and _same(preset[k], cfg[k]))

    return max(names, key=score)


def _same(a: Any, b: Any) -> bool:
    norm = lambda x: tuple(x) if isinstance(x, (list, tuple)) else x  # noqa: E731
    return norm(a) == norm(b)


def import_checkpoint(
    path: str | Path,
    source: str = "mae",
    model: str | None = None,
    encoder_only: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Convert an official or Hugging Face checkpoint into a mimkit checkpoint dict.

    source: "mae" | "cae" | "convmae" (a .pth / .pt / .safetensors file in the authors' layout) or "hf"
    (a directory with config.json + model.safetensors or pytorch_model.bin). `model` picks the preset name
    (default: inferred); `overrides` set config fields the shapes do not reveal (e.g. num_heads).

    The import is strict: a tensor of the model that the file lacks, or a tensor of the file that has no
    place in the model, is an error naming them. `encoder_only=True` accepts a file that holds just an
    encoder (a released encoder, a fine-tuned backbone, mimkit's own encoder.safetensors): everything else is
    freshly initialised and listed in `ckpt['imported_from']['initialised']`.
    Save the result with `mimkit.engine.checkpoint.atomic_save(ckpt, 'out.pt')`.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; choose one of {SOURCES}")
    args: dict[str, Any] = {}
    dropped: list[str] = []
    if source == "hf":
        from .hf import hf_to_mae_state_dict, mimkit_overrides_from_hf

        hf_sd, hf_cfg = load_hf_directory(path)
        sd = hf_to_mae_state_dict(hf_sd)
        cfg, method = mimkit_overrides_from_hf(hf_cfg), "mae"
    else:
        raw, args = _state_dict_and_args(load_weights_file(path))
        if source == "mae":
            sd, method = mae_from_official_state_dict(raw), "mae"
            cfg = _mae_config(sd, args, overrides)
        elif source == "cae":
            keep_teacher = float(overrides.get("momentum", 0.0)) > 0
            sd, dropped = cae_from_official_state_dict(raw, keep_teacher=keep_teacher)
            unknown = [k for k in dropped if not k.startswith(_CAE_TEACHERS)]
            if unknown and not encoder_only:
                raise ValueError(
                    f"{path}: {len(unknown)} tensors match no CAE layout mimkit knows, e.g. {unknown[:4]}; "
                    "pass --encoder-only to import just the encoder"
                )
            method = "cae"
            cfg = _cae_config(sd, args, overrides)
        else:
            from .layouts import convmae_from_official_state_dict

            sd, method = convmae_from_official_state_dict(raw), "convmae"
            cfg = _convmae_config(sd, args, overrides)
    if "encoder.patch_embed.proj.weight" not in sd and "encoder.patch_embed1.proj.weight" not in sd:
        raise ValueError(
            f"{path} holds no {method} encoder (no patch embedding among {len(sd)} tensors); "
            f"is it a {method} checkpoint? (--from mae|cae|convmae|hf)"
        )
    cfg.update(overrides)
    name = _preset_for(method, cfg, model)
    net: Any = create_model(name, **cfg)  # a method (CAE: .teacher)
    own = net.state_dict()
    for key, value in sd.items():
        if key in own and own[key].shape != value.shape:
            raise ValueError(
                f"{key}: checkpoint shape {tuple(value.shape)} != model shape {tuple(own[key].shape)}; "
                "pass the matching option (e.g. num_heads=, img_size=) or --model"
            )
    if encoder_only:
        sd = {k: v for k, v in sd.items() if k.startswith("encoder.")}
    result = net.load_state_dict(sd, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"checkpoint tensors with no place in {name}: {result.unexpected_keys[:8]}")
    initialised = [k for k in result.missing_keys if not k.startswith(("tokenizer.", "teacher."))]
    if initialised and not encoder_only:
        raise ValueError(
            f"{path} lacks {len(initialised)} tensors of {name} (e.g. {_summarise(initialised)}): importing "
            "it would leave them freshly initialised. If the file holds only an encoder, pass --encoder-only "
            "(Python: encoder_only=True); otherwise check --from and --model"
        )
    if any(k.startswith("teacher.") for k in result.missing_keys):
        net.teacher.load_state_dict(
            net.encoder.state_dict()
        )  # no teacher in the file: start from the encoder
    if encoder_only and initialised:
        warnings.warn(
            f"{len(initialised)} tensors outside the encoder keep their fresh initialisation "
            f"({_summarise(initialised)}); fine for using the encoder, retrain them before reconstructing",
            stacklevel=2,
        )
    if encoder_only and dropped:
        warnings.warn(f"ignored {len(dropped)} checkpoint tensors: {_summarise(dropped)}", stacklevel=2)
    return {
        "format": FORMAT,
        "model_name": name,
        "model_config": dataclasses.asdict(net.config),
        "model": net.state_dict(),
        "imported_from": {
            "source": source,
            "path": str(path),
            "initialised": initialised,
            "dropped": dropped,
        },
    }
