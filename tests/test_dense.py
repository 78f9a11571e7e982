"""Dense prediction: timm's feature contract on every encoder, feature pyramids, the segmentation dataset
and the segmentation check. Golden values come from timm's own ViT / BEiT built from the exported weights."""

from __future__ import annotations

import pytest
import torch

import mimkit
from mimkit.interop import export_timm
from mimkit.interop.export import load_timm

timm = pytest.importorskip("timm")

SIZES = {
    "mae": dict(
        embed_dim=32, depth=3, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2
    ),
    "cae": dict(embed_dim=32, depth=3, num_heads=2, regressor_depth=1, decoder_depth=1, decoder_num_heads=2),
    "convmae": dict(
        embed_dims=(16, 24, 32), depths=(1, 1, 3), num_heads=2, decoder_embed_dim=32, decoder_depth=1
    ),
}


def _model(name: str, **kw) -> torch.nn.Module:
    return _perturb(mimkit.create_model(name, **{**SIZES[name.split("_")[0]], **kw}))


def _perturb(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Move every weight off its init (zero biases, unit norms and layer scales would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _encoder(name: str, **kw) -> torch.nn.Module:
    return _model(name, **kw).encoder


# ------------------------------------------------------------------------------------ feature contract


@pytest.mark.parametrize("img_size", [32, (32, 48)])
@pytest.mark.parametrize("name", ["mae_vit_tiny_patch4_32", "cae_vit_tiny_patch4_32"])
def test_forward_intermediates_matches_timm_after_strict_load(tmp_path, name, img_size):
    model = _model(name, img_size=img_size)
    info = export_timm(model, tmp_path / "enc")  # timm ViT for MAE, timm BEiT for CAE; loads strict=True
    ref = load_timm(tmp_path / "enc.json")
    images = torch.randn(2, 3, *model.encoder.patch_embed.img_size)
    with torch.no_grad():
        for kwargs in (
            dict(indices=None),
            dict(indices=2, norm=True),
            dict(indices=[0, -1], output_fmt="NLC"),
            dict(indices=[1], return_prefix_tokens=True, stop_early=True),
        ):
            ours_final, ours = model.encoder.forward_intermediates(images, **kwargs)
            theirs_final, theirs = ref.forward_intermediates(images, **kwargs)
            torch.testing.assert_close(ours_final, theirs_final, atol=1e-5, rtol=0)
            assert len(ours) == len(theirs) > 0
            for a, b in zip(ours, theirs):
                for x, y in zip(a, b) if isinstance(a, tuple) else [(a, b)]:
                    torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
        only = model.encoder.forward_intermediates(images, indices=1, intermediates_only=True)
        torch.testing.assert_close(only[0], ref.forward_intermediates(images, indices=1, intermediates_only=True)[0],
                                   atol=1e-5, rtol=0)  # fmt: skip
    assert [(f["num_chs"], f["reduction"], f["module"]) for f in model.encoder.feature_info] == [
        (f["num_chs"], f["reduction"], f["module"]) for f in ref.feature_info
    ]
    assert info["timm_kwargs"]["depth"] == 3


def _block_outputs(encoder: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output by forward hooks on the plain forward: the reference the contract must give."""
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o)) for b in encoder.blocks]
    try:
        final = encoder.forward_features(images)
    finally:
        for h in hooks:
            h.remove()
    return outs + [final]


@pytest.mark.parametrize("img_size", [64, (48, 80)])
def test_convvit_intermediates_are_its_stages_and_blocks(img_size):
    enc = _encoder("convmae_tiny_patch8_64", img_size=img_size)
    H, W = (img_size, img_size) if isinstance(img_size, int) else img_size
    images = torch.randn(2, 3, H, W)
    with torch.no_grad():
        final, feats = enc.forward_intermediates(images, norm=False)
        *blocks, reference_final = _block_outputs(enc, images)
        pyramid = enc.forward_pyramid(images)
    assert len(feats) == len(enc.feature_info) == 2 + 3
    for f, info in zip(feats, enc.feature_info):  # channels and reduction as announced
        assert f.shape == (2, info["num_chs"], H // info["reduction"], W // info["reduction"])
    torch.testing.assert_close(feats[0], pyramid["stride2"], atol=0, rtol=0)
    torch.testing.assert_close(feats[1], pyramid["stride4"], atol=0, rtol=0)
    gh, gw = H // 8, W // 8
    for f, b in zip(feats[2:], blocks):  # the ViT blocks' own outputs, exactly
        torch.testing.assert_close(f, b.reshape(2, gh, gw, -1).permute(0, 3, 1, 2), atol=0, rtol=0)
    torch.testing.assert_close(final, reference_final, atol=0, rtol=0)
    with torch.no_grad():  # the last block normed = the final output; NLC = the maps flattened
        (last,) = enc.forward_intermediates(images, indices=1, norm=True, intermediates_only=True)
        nlc = enc.forward_intermediates(images, indices=[0, -1], output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(last, pyramid["stride8"], atol=1e-6, rtol=0)
    torch.testing.assert_close(nlc[0], feats[0].flatten(2).transpose(1, 2), atol=0, rtol=0)
    torch.testing.assert_close(nlc[1], feats[-1].flatten(2).transpose(1, 2), atol=0, rtol=0)


def test_vit_intermediates_are_its_blocks():
    enc = _encoder("mae_vit_tiny_patch4_32", img_size=(32, 48))
    images = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        final, feats = enc.forward_intermediates(images)
        *blocks, reference_final = _block_outputs(enc, images)
    for f, b, info in zip(feats, blocks, enc.feature_info, strict=True):
        assert f.shape == (2, info["num_chs"], 32 // info["reduction"], 48 // info["reduction"])
        torch.testing.assert_close(f, b[:, 1:].reshape(2, 8, 12, -1).permute(0, 3, 1, 2), atol=0, rtol=0)
    torch.testing.assert_close(final, reference_final, atol=0, rtol=0)


def test_intermediate_indices_are_checked():
    enc = _encoder("mae_vit_tiny_patch4_32")
    images = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="out of range"):
        enc.forward_intermediates(images, indices=[3])
    with pytest.raises(ValueError, match="last 4 of 3"):
        enc.forward_intermediates(images, indices=4)
    with pytest.raises(ValueError, match="output_fmt"):
        enc.forward_intermediates(images, output_fmt="NHWC")
