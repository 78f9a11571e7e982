"""Other projects' checkpoint layouts <-> mimkit's: key renames only (every tensor keeps its shape).

- CAE encoder -> timm `Beit` (export): `cae_encoder_to_timm_beit`.
- ConvMAE, the authors' `models_convmae.py` layout <-> mimkit (import and back):
  `convmae_from_official_state_dict`, `convmae_to_official_state_dict`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["cae_encoder_to_timm_beit", "convmae_from_official_state_dict", "convmae_to_official_state_dict"]


def cae_encoder_to_timm_beit(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a CAE encoder state dict (mimkit/timm-ViT names) to timm `Beit` names.

    Only the layer-scale names differ: `blocks.N.ls1.gamma` -> `blocks.N.gamma_1`, `ls2.gamma` -> `gamma_2`;
    q_bias/v_bias, qkv, proj, norms, mlp, cls_token, pos_embed and patch_embed keep their names. The result
    loads with strict=True into `timm.create_model('beit_base_patch16_224', num_classes=0,
    use_abs_pos_emb=True, use_rel_pos_bias=False, init_values=0.1, global_pool='token')` (with
    global_pool='avg' timm moves the final norm to `fc_norm`, applied after pooling: rename `norm.*` there).
    """
    out = {}
    for key, value in state_dict.items():
        key = key.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------------
# The authors' checkpoint layout (models_convmae.py): encoder keys at the top level (patch_embed1..4,
# pos_embed, blocks1..3, stage1/2_output_decode, norm), decoder keys as MAE. mimkit nests the encoder under
# `encoder.`; every tensor keeps its name and shape otherwise.

OFFICIAL_ENCODER_PREFIXES = (
    "patch_embed1.", "patch_embed2.", "patch_embed3.", "patch_embed4.", "pos_embed",
    "blocks1.", "blocks2.", "blocks3.", "stage1_output_decode.", "stage2_output_decode.", "norm.",
)  # fmt: skip
OFFICIAL_DECODER_PREFIXES = (
    "decoder_embed.", "mask_token", "decoder_pos_embed", "decoder_blocks.", "decoder_norm.", "decoder_pred.",
)  # fmt: skip


def convmae_from_official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an authors'-layout ConvMAE state dict (or a checkpoint holding it under "model") to mimkit keys.

    Encoder keys gain the `encoder.` prefix; decoder keys are unchanged. A fine-tuned encoder checkpoint
    (no decoder) maps too: load it with `model.load_state_dict(sd, strict=False)` or into `model.encoder`.
    Keys of neither part (e.g. a classification `head`) raise an error naming them.
    """
    if "model" in state_dict and isinstance(state_dict["model"], Mapping):
        state_dict = state_dict["model"]
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if key.startswith(OFFICIAL_ENCODER_PREFIXES):
            out["encoder." + key] = value
        elif key.startswith(OFFICIAL_DECODER_PREFIXES):
            out[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"not a ConvMAE pretraining state dict: unexpected keys {unknown[:8]}{' ...' if len(unknown) > 8 else ''}"
            "; drop classification-head keys (head.*, fc_norm.*) before importing"
        )
    return out


def convmae_to_official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `convmae_from_official_state_dict`: mimkit ConvMAE keys -> the authors' layout."""
    return {k.removeprefix("encoder."): v for k, v in state_dict.items()}
