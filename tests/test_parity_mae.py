"""MAE parity with peer code built from configs (no downloads): Hugging Face ViTMAE and timm ViT."""

from __future__ import annotations

import pytest
import torch

import mimkit
from mimkit.backbones.vit import VisionTransformer
from mimkit.interop.hf import (
    hf_config_from_mimkit,
    hf_layout,
    hf_to_mae_state_dict,
    mae_to_hf_state_dict,
    noise_for_mask,
)
from mimkit.layers import set_fused_attention

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

SMALL = dict(embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4)


def _perturb(model: torch.nn.Module, scale: float = 0.05) -> None:
    """Make biases, norms and frozen pos-embeds non-trivial, so a mis-mapped tensor cannot go unnoticed."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _pair(name: str, fused: bool, **overrides):
    """A mimkit MAE and a ViTMAEForPreTraining built from the equivalent config, holding the same weights."""
    model = mimkit.create_model(name, **overrides).eval()
    _perturb(model)
    set_fused_attention(model, fused)
    hf_cfg = hf_config_from_mimkit(model.config, attn_implementation="sdpa" if fused else "eager")
    hf = transformers.ViTMAEForPreTraining(hf_cfg).eval()
    hf.load_state_dict(mae_to_hf_state_dict(model.state_dict(), hf_layout(hf)), strict=True)
    return model, hf


def _grid_order(hf_tokens: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """HF encoder output [B, 1 + keep, D] is in noise order; put the patch tokens back in grid order."""
    from mimkit.interop.hf import hf_visible_to_grid_order

    return hf_visible_to_grid_order(hf_tokens, noise)


@pytest.mark.parametrize("fused", [False, True], ids=["math", "sdpa"])
@pytest.mark.parametrize("norm_pix", [True, False], ids=["normpix", "rawpix"])
def test_mae_loss_and_pred_match_hf_vitmae(norm_pix: bool, fused: bool):
    model, hf = _pair("mae_vit_tiny_patch4_32", fused, norm_pix_loss=norm_pix, **SMALL)
    images = torch.randn(3, 3, 32, 32)
    mask = model.mask_generator(3, torch.Generator().manual_seed(3))
    noise = noise_for_mask(mask, torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = model(images, mask=mask)
        theirs = hf(pixel_values=images, noise=noise)
    assert torch.equal(theirs.mask.bool(), mask)
    torch.testing.assert_close(ours.pred, theirs.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fused", [False, True], ids=["math", "sdpa"])
def test_mae_encoder_features_match_hf_visible_tokens(fused: bool):
    model, hf = _pair("mae_vit_tiny_patch4_32", fused, **SMALL)
    images = torch.randn(2, 3, 32, 32)
    mask = model.mask_generator(2, torch.Generator().manual_seed(5))
    noise = noise_for_mask(mask, torch.Generator().manual_seed(6))
    keep = int((~mask[0]).sum())
    # The noise shuffles the visible patches, so HF's raw token order is not the grid order.
    assert not torch.equal(noise.argsort(1)[:, :keep], noise.argsort(1)[:, :keep].sort(1).values)
    with torch.no_grad():
        ours = model.forward_encoder(images, mask)  # [B, 1 + keep, D], grid order
        theirs = hf.vit(pixel_values=images, noise=noise).last_hidden_state  # [B, 1 + keep, D], noise order
    assert ours.shape == theirs.shape == (2, 1 + keep, SMALL["embed_dim"])
    torch.testing.assert_close(ours, _grid_order(theirs, noise), atol=1e-5, rtol=0)


def test_hf_state_dict_round_trip_is_exact():
    model, hf = _pair("mae_vit_tiny_patch4_32", False, **SMALL)
    back = hf_to_mae_state_dict(hf.state_dict())
    ours = model.state_dict()
    assert set(back) == set(ours)
    for key, value in ours.items():
        assert torch.equal(back[key], value), key
    # Hugging Face's on-disk names map back too.
    legacy = mae_to_hf_state_dict(ours, "legacy")
    assert any(k.startswith("vit.encoder.layer.0.attention.attention.query") for k in legacy)
    assert any(k.startswith("decoder.decoder_layers.1.") for k in legacy)
    back = hf_to_mae_state_dict(legacy)
    assert all(torch.equal(back[k], v) for k, v in ours.items())


def test_hf_config_carries_mae_layer_norm_eps():
    model = mimkit.create_model("mae_vit_tiny_patch4_32", **SMALL)
    cfg = hf_config_from_mimkit(model.config)
    assert cfg.layer_norm_eps == 1e-6 and cfg.hidden_act == "gelu"
    assert (cfg.image_size, cfg.patch_size, cfg.num_channels) == (32, 4, 3)
    assert cfg.decoder_hidden_size == 32 and cfg.decoder_num_hidden_layers == 2


@pytest.mark.slow
def test_mae_base_size_matches_hf_vitmae():
    model, hf = _pair("mae_vit_base_patch16_224", False, norm_pix_loss=True)
    images = torch.randn(1, 3, 224, 224)
    mask = model.mask_generator(1, torch.Generator().manual_seed(7))
    noise = noise_for_mask(mask, torch.Generator().manual_seed(8))
    with torch.no_grad():
        ours = model(images, mask=mask)
        theirs = hf(pixel_values=images, noise=noise)
    torch.testing.assert_close(ours.pred, theirs.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=0)


def _timm_pair(timm_name: str, fused: bool, **timm_kwargs):
    ref = timm.create_model(timm_name, num_classes=0, **timm_kwargs).eval()
    cfg = ref.patch_embed
    encoder = VisionTransformer(
        tuple(cfg.img_size),
        cfg.patch_size[0],
        in_chans=cfg.proj.in_channels,
        embed_dim=ref.embed_dim,
        depth=len(ref.blocks),
        num_heads=ref.blocks[0].attn.num_heads,
    ).eval()
    _perturb(encoder)
    set_fused_attention(encoder, fused)
    ref.load_state_dict(encoder.state_dict(), strict=True)
    return encoder, ref


@pytest.mark.parametrize("fused", [False, True], ids=["math", "sdpa"])
@pytest.mark.parametrize(
    "kwargs",
    [dict(img_size=64, depth=4), dict(img_size=(48, 64), in_chans=1, depth=4)],
    ids=["square", "nonsquare_gray"],
)
def test_encoder_features_match_timm_vit_tiny(kwargs, fused: bool):
    encoder, ref = _timm_pair("vit_tiny_patch16_224", fused, **kwargs)
    size = kwargs["img_size"] if isinstance(kwargs["img_size"], tuple) else (kwargs["img_size"],) * 2
    images = torch.randn(2, kwargs.get("in_chans", 3), *size)
    with torch.no_grad():
        torch.testing.assert_close(
            encoder.forward_features(images), ref.forward_features(images), atol=1e-5, rtol=0
        )


@pytest.mark.slow
def test_encoder_features_match_timm_vit_base():
    encoder, ref = _timm_pair("vit_base_patch16_224", False)
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(
            encoder.forward_features(images), ref.forward_features(images), atol=1e-5, rtol=0
        )
