"""mimkit MAE <-> Hugging Face ViTMAE: parameter names, configs, and the `noise` that reproduces a mask.

Hugging Face stores ViTMAE under two naming schemes, and both are read here:

- the on-disk names of every released checkpoint (transformers 4.x), which `export` writes:
  `vit.embeddings.{cls_token, position_embeddings, patch_embeddings.projection}`,
  `vit.encoder.layer.N.{layernorm_before, attention.attention.{query,key,value}, attention.output.dense,
  layernorm_after, intermediate.dense, output.dense}`, `vit.layernorm`, and
  `decoder.{decoder_embed, mask_token, decoder_pos_embed, decoder_layers.N.*, decoder_norm, decoder_pred}`;
- the in-memory names of transformers 5.x (`vit.layers.N.attention.{q,k,v,o}_proj`, `mlp.fc1/fc2`).

mimkit keeps one fused `attn.qkv` projection ([3D, D], rows ordered q, k, v); Hugging Face splits it.
Hugging Face's LayerNorm eps defaults to 1e-12 where MAE uses 1e-6: configs built here carry the eps
explicitly, and imported configs keep whatever eps the source used.
"""

from __future__ import annotations

import re
from typing import Any

import torch

# mimkit block suffix -> Hugging Face legacy (on-disk) block suffix; qkv is handled apart (split in three).
_BLOCK_LEGACY = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_QKV_LEGACY = ("attention.attention.query", "attention.attention.key", "attention.attention.value")

# Hugging Face transformers>=5 block suffix -> legacy suffix.
_CURRENT_TO_LEGACY = {
    "attention.q_proj": "attention.attention.query",
    "attention.k_proj": "attention.attention.key",
    "attention.v_proj": "attention.attention.value",
    "attention.o_proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
    "layernorm_before": "layernorm_before",
    "layernorm_after": "layernorm_after",
}
_LEGACY_TO_CURRENT = {v: k for k, v in _CURRENT_TO_LEGACY.items()}

# Non-block names: mimkit -> Hugging Face.
_TOP_LEVEL = {
    "encoder.cls_token": "vit.embeddings.cls_token",
    "encoder.pos_embed": "vit.embeddings.position_embeddings",
    "encoder.patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
    "encoder.patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
    "encoder.norm.weight": "vit.layernorm.weight",
    "encoder.norm.bias": "vit.layernorm.bias",
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.decoder_pos_embed",
    "decoder_embed.weight": "decoder.decoder_embed.weight",
    "decoder_embed.bias": "decoder.decoder_embed.bias",
    "decoder_norm.weight": "decoder.decoder_norm.weight",
    "decoder_norm.bias": "decoder.decoder_norm.bias",
    "decoder_pred.weight": "decoder.decoder_pred.weight",
    "decoder_pred.bias": "decoder.decoder_pred.bias",
}
_TOP_LEVEL_INV = {v: k for k, v in _TOP_LEVEL.items()}

# (mimkit block prefix, Hugging Face legacy block prefix)
_STACKS = (("encoder.blocks.", "vit.encoder.layer."), ("decoder_blocks.", "decoder.decoder_layers."))


def mae_to_hf_state_dict(
    state_dict: dict[str, torch.Tensor], layout: str = "legacy"
) -> dict[str, torch.Tensor]:
    """mimkit MAE state dict -> ViTMAEForPreTraining state dict.

    layout: "legacy" = Hugging Face's on-disk names (what `save_pretrained` files and released checkpoints
    hold; every transformers version reads them through `from_pretrained`); "current" = the parameter names
    of transformers>=5 modules, for `model.load_state_dict` (see `hf_layout(model)`).
    An encoder-only state dict (keys under `encoder.` only) gives the `vit.*` part alone.
    """
    if layout not in ("legacy", "current"):
        raise ValueError(f"layout must be 'legacy' or 'current', got {layout!r}")
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in _TOP_LEVEL:
            out[_TOP_LEVEL[key]] = value
            continue
        for ours, theirs in _STACKS:
            if not key.startswith(ours):
                continue
            index, suffix = key[len(ours) :].split(".", 1)
            param = suffix.rsplit(".", 1)  # ("attn.qkv", "weight")
            if param[0] == "attn.qkv":
                for name, chunk in zip(_QKV_LEGACY, value.chunk(3, dim=0)):
                    out[f"{theirs}{index}.{name}.{param[1]}"] = chunk.clone()
            elif param[0] in _BLOCK_LEGACY:
                out[f"{theirs}{index}.{_BLOCK_LEGACY[param[0]]}.{param[1]}"] = value
            else:
                raise ValueError(
                    f"{key!r} has no Hugging Face ViTMAE counterpart (ViTMAE has no layer scale or q/v-only "
                    "biases); export this model with --format timm or --format safetensors instead"
                )
            break
        else:
            raise ValueError(
                f"{key!r} is not part of a mimkit MAE model; cannot map it to Hugging Face ViTMAE"
            )
    return {_to_current_key(k): v for k, v in out.items()} if layout == "current" else out


def hf_layout(model: torch.nn.Module) -> str:
    """Return "current" when a transformers ViTMAE module uses transformers>=5 parameter names, else "legacy"."""
    return "current" if any(".q_proj." in k for k, _ in model.named_parameters()) else "legacy"


def _to_current_key(key: str) -> str:
    """Legacy Hugging Face ViTMAE key -> transformers>=5 module parameter name."""
    key = re.sub(r"^vit\.encoder\.layer\.", "vit.layers.", key)
    m = re.match(r"^(vit\.layers\.\d+\.|decoder\.decoder_layers\.\d+\.)(.+)\.(weight|bias)$", key)
    if m and m.group(2) in _LEGACY_TO_CURRENT:
        key = f"{m.group(1)}{_LEGACY_TO_CURRENT[m.group(2)]}.{m.group(3)}"
    return key


def _to_legacy_key(key: str) -> str:
    """Any Hugging Face ViTMAE key (legacy, transformers>=5, ViTMAEModel without `vit.`) -> legacy name."""
    if key.startswith(("embeddings.", "encoder.layer.", "layers.", "layernorm.")):
        key = "vit." + key  # saved from ViTMAEModel: no `vit.` prefix
    # transformers 5.x save_pretrained writes decoder layers as `decoder.decoder_encoder.layer.N`.
    key = key.replace("decoder.decoder_encoder.layer.", "decoder.decoder_layers.")
    key = re.sub(r"^vit\.layers\.", "vit.encoder.layer.", key)
    m = re.match(r"^(vit\.encoder\.layer\.\d+\.|decoder\.decoder_layers\.\d+\.)(.+)\.(weight|bias)$", key)
    if m and m.group(2) in _CURRENT_TO_LEGACY:
        key = f"{m.group(1)}{_CURRENT_TO_LEGACY[m.group(2)]}.{m.group(3)}"
    return key


def hf_to_mae_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ViTMAE state dict (either naming scheme, with or without the decoder) -> mimkit MAE."""
    legacy = {_to_legacy_key(k): v for k, v in state_dict.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    inverse_block = {v: k for k, v in _BLOCK_LEGACY.items()}
    for key, value in legacy.items():
        if key in _TOP_LEVEL_INV:
            out[_TOP_LEVEL_INV[key]] = value
            continue
        for ours, theirs in _STACKS:
            if not key.startswith(theirs):
                continue
            index, suffix = key[len(theirs) :].split(".", 1)
            name, kind = suffix.rsplit(".", 1)
            if name in _QKV_LEGACY:
                qkv.setdefault(f"{ours}{index}.attn.qkv.{kind}", {})[name] = value
            elif name in inverse_block:
                out[f"{ours}{index}.{inverse_block[name]}.{kind}"] = value
            else:
                raise ValueError(f"unrecognised Hugging Face ViTMAE parameter {key!r}")
            break
        else:
            raise ValueError(
                f"unrecognised Hugging Face ViTMAE parameter {key!r}; is this a ViTMAE checkpoint "
                "(config.json model_type 'vit_mae')?"
            )
    for key, parts in qkv.items():
        if len(parts) != 3:
            raise ValueError(f"{key}: the checkpoint lacks {sorted(set(_QKV_LEGACY) - set(parts))}")
        out[key] = torch.cat([parts[n] for n in _QKV_LEGACY], dim=0)
    return out


def hf_config_from_mimkit(config: Any, **extra: Any):
    """A `transformers.ViTMAEConfig` describing the same network as a mimkit `MAEConfig`.

    `extra` is passed to ViTMAEConfig (e.g. `attn_implementation="eager"` for exact-math comparisons).
    """
    from transformers import ViTMAEConfig

    img = config.img_size
    if not isinstance(img, int):
        img = int(img[0]) if img[0] == img[1] else [int(s) for s in img]
    if getattr(config, "mask_kind", "random") != "random":
        raise ValueError("Hugging Face ViTMAE supports random masking only (mask_kind='random')")
    return ViTMAEConfig(
        hidden_size=config.embed_dim,
        num_hidden_layers=config.depth,
        num_attention_heads=config.num_heads,
        intermediate_size=int(config.embed_dim * config.mlp_ratio),
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=config.norm_eps,
        image_size=img,
        patch_size=config.patch_size,
        num_channels=config.in_chans,
        qkv_bias=True,
        decoder_num_attention_heads=config.decoder_num_heads,
        decoder_hidden_size=config.decoder_embed_dim,
        decoder_num_hidden_layers=config.decoder_depth,
        decoder_intermediate_size=int(config.decoder_embed_dim * config.mlp_ratio),
        mask_ratio=config.mask_ratio,
        norm_pix_loss=config.norm_pix_loss,
        architectures=["ViTMAEForPreTraining"],
        **extra,
    )


def mimkit_overrides_from_hf(hf_config: Any) -> dict[str, Any]:
    """MAEConfig fields from a Hugging Face ViTMAE config (a ViTMAEConfig or the parsed config.json)."""
    c = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    if c.get("model_type", "vit_mae") != "vit_mae":
        raise ValueError(
            f"expected a ViTMAE config (model_type 'vit_mae'), got model_type {c.get('model_type')!r}"
        )
    if c.get("hidden_act", "gelu") != "gelu" or not c.get("qkv_bias", True):
        raise ValueError("mimkit MAE needs hidden_act='gelu' and qkv_bias=True; this ViTMAE config differs")
    mlp_ratio = c["intermediate_size"] / c["hidden_size"]
    dec_ratio = c["decoder_intermediate_size"] / c["decoder_hidden_size"]
    if mlp_ratio != dec_ratio:
        raise ValueError(
            f"encoder MLP ratio {mlp_ratio} differs from decoder MLP ratio {dec_ratio}; mimkit MAE uses one ratio"
        )
    img = c["image_size"]
    patch = c["patch_size"]
    if not isinstance(patch, int):
        if patch[0] != patch[1]:
            raise ValueError(f"mimkit needs square patches, got patch_size {patch}")
        patch = int(patch[0])
    return dict(
        img_size=img if isinstance(img, int) else tuple(img),
        patch_size=patch,
        in_chans=c.get("num_channels", 3),
        embed_dim=c["hidden_size"],
        depth=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"],
        mlp_ratio=mlp_ratio,
        decoder_embed_dim=c["decoder_hidden_size"],
        decoder_depth=c["decoder_num_hidden_layers"],
        decoder_num_heads=c["decoder_num_attention_heads"],
        mask_ratio=c.get("mask_ratio", 0.75),
        norm_pix_loss=bool(c.get("norm_pix_loss", False)),
        norm_eps=c.get("layer_norm_eps", 1e-12),
    )


def noise_for_mask(mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise [B, L] whose argsort keeps exactly the visible patches of `mask` ([B, L] bool, True = masked).

    Visible patches get values in [0, 1), masked ones in [1, 2), each in a random order, so Hugging Face's
    `random_masking(noise=...)` keeps the same set as mimkit (its token order is the noise order).
    """
    return torch.rand(mask.shape, generator=generator) + mask.to(torch.float32)


def hf_visible_to_grid_order(tokens: torch.Tensor, noise: torch.Tensor, num_prefix: int = 1) -> torch.Tensor:
    """Reorder Hugging Face's encoder output [B, prefix + keep, D] (noise order) into grid order."""
    keep = tokens.shape[1] - num_prefix
    ids_keep = noise.argsort(dim=1)[:, :keep]  # [B, keep] grid index of each HF token
    order = ids_keep.argsort(dim=1)  # HF token positions sorted by grid index
    patches = tokens[:, num_prefix:].gather(1, order.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return torch.cat([tokens[:, :num_prefix], patches], dim=1)
