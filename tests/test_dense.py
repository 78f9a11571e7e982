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


@pytest.mark.parametrize("name", ["mae_vit_tiny_patch4_32", "convmae_tiny_patch8_64"])
def test_encoders_drop_into_timms_feature_wrapper(name):
    """timm's own `features_only` wrapper for forward_intermediates models takes a mimkit encoder as it is."""
    from timm.models._features import FeatureGetterNet

    enc = _encoder(name, img_size=(32, 48) if name.startswith("mae") else (48, 64))
    net = FeatureGetterNet(enc, out_indices=3, norm=True).eval()
    images = torch.randn(2, 3, *((32, 48) if name.startswith("mae") else (48, 64)))
    with torch.no_grad():
        feats = net(images)
    info = net.feature_info
    assert len(feats) == 3
    for f, chs, red in zip(feats, info.channels(), info.reduction(), strict=True):
        assert f.shape == (2, chs, images.shape[2] // red, images.shape[3] // red)
    with torch.no_grad():
        torch.testing.assert_close(feats[-1], enc.forward_intermediates(images, indices=1, norm=True)[1][0])


def test_intermediate_indices_are_checked():
    enc = _encoder("mae_vit_tiny_patch4_32")
    images = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="out of range"):
        enc.forward_intermediates(images, indices=[3])
    with pytest.raises(ValueError, match="last 4 of 3"):
        enc.forward_intermediates(images, indices=4)
    with pytest.raises(ValueError, match="output_fmt"):
        enc.forward_intermediates(images, output_fmt="NHWC")


# ------------------------------------------------------------------------------------------------ pyramids


@pytest.mark.parametrize(
    "name, kw, expected",
    [
        ("mae_vit_tiny_patch4_32", dict(img_size=(32, 48)), {"p0": 1, "p1": 2, "p2": 4, "p3": 8}),
        ("mae_vit_tiny_patch4_32", dict(img_size=(64, 96), patch_size=16), {"p2": 4, "p3": 8, "p4": 16, "p5": 32}),
        ("convmae_tiny_patch8_64", dict(img_size=(48, 80)), {"p1": 2, "p2": 4, "p3": 8, "p4": 16}),
        ("convmae_tiny_patch8_64", dict(img_size=(64, 96), strides=(4, 2, 2)), {"p2": 4, "p3": 8, "p4": 16, "p5": 32}),
    ],
)  # fmt: skip
def test_pyramid_levels_for_square_and_non_square_inputs(name, kw, expected):
    from mimkit.dense import build_pyramid

    enc = _encoder(name, **kw)
    pyramid = build_pyramid(enc, out_channels=8).eval()
    H, W = kw["img_size"]
    for size in ((H, W), (H, H)):
        if name.startswith("mae") and size != (H, W):
            continue  # a ViT runs at its own size (mimkit.dense.encoder_at_size rebuilds it)
        with torch.no_grad():
            levels = pyramid(torch.randn(2, 3, *size))
        assert list(levels) == list(expected)  # finest first, named p<log2 stride>
        for key, stride in expected.items():
            assert levels[key].shape == (2, 8, -(-size[0] // stride), -(-size[1] // stride)), key
    assert pyramid.strides == tuple(expected.values()) and pyramid.out_channels == 8


@pytest.mark.parametrize(
    "name, strides", [("mae_vit_tiny_patch4_32", (2, 4, 8)), ("convmae_tiny_patch8_64", (2, 4, 8, 16))]
)
def test_pyramid_min_stride_leaves_out_finer_levels(name, strides):
    from mimkit.dense import build_pyramid

    enc = _encoder(name, img_size=64)
    full, pruned = build_pyramid(enc, 8), build_pyramid(enc, 8, min_stride=2)
    assert pruned.strides == strides
    assert sum(p.numel() for p in pruned.parameters()) < sum(
        p.numel() for p in full.parameters()
    ) or name.startswith("convmae")
    with torch.no_grad():
        levels = pruned(torch.randn(1, 3, 64, 64))
    assert [v.shape[-1] for v in levels.values()] == [64 // s for s in strides]


def test_simple_pyramid_reads_the_normed_last_block():
    """The ViT neck gets exactly the final features; changing the last block changes every level."""
    from mimkit.dense import build_pyramid

    enc = _encoder("mae_vit_tiny_patch4_32")
    pyramid = build_pyramid(enc, out_channels=8).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        (m,) = pyramid.maps(images)
        final = enc.forward_features(images)[:, 1:]  # [B, L, D] after the final norm
        torch.testing.assert_close(m, final.reshape(2, 8, 8, -1).permute(0, 3, 1, 2), atol=0, rtol=0)
        before = pyramid(images)
        enc.blocks[-1].mlp.fc2.bias.add_(1.0)
        after = pyramid(images)
    assert all(not torch.allclose(before[k], after[k]) for k in before)


def test_pixel_encoder_is_patchify():
    from mimkit.dense import PixelEncoder
    from mimkit.targets import patchify

    images = torch.randn(2, 3, 16, 24)
    (m,) = PixelEncoder(4, 3).forward_intermediates(images, intermediates_only=True)
    assert m.shape == (2, 48, 4, 6)
    torch.testing.assert_close(m.flatten(2).transpose(1, 2), patchify(images, 4), atol=0, rtol=0)


def test_encoder_at_size_keeps_weights_and_uses_the_new_sincos_grid():
    from mimkit.dense import encoder_at_size
    from mimkit.layers import sincos_2d

    model = mimkit.create_model("mae_vit_tiny_patch4_32", **SIZES["mae"]).eval()
    enc = encoder_at_size(model, 48)
    assert enc.patch_embed.img_size == (48, 48)
    torch.testing.assert_close(enc.pos_embed[0], sincos_2d(32, (12, 12), cls_token=True), atol=0, rtol=0)
    torch.testing.assert_close(enc.blocks[1].mlp.fc1.weight, model.encoder.blocks[1].mlp.fc1.weight)
    # A table that is not the sin-cos function is resized bicubically instead.
    with torch.no_grad():
        model.encoder.pos_embed.add_(0.5)
    from mimkit.interop import resize_pos_embed

    expected = resize_pos_embed(model.encoder.pos_embed, (8, 8), (12, 12))
    torch.testing.assert_close(encoder_at_size(model, 48).pos_embed, expected)


# ------------------------------------------------------------------------------------------ dense dataset


class _Garments:
    """A constructed garment source: garment g is a 10x12 patch, g-dependent pixel values (0 = empty,
    then a ramp 1..240, so the intensity threshold cuts inside each garment), label g % 3."""

    classes = ["a", "b", "c"]

    def __init__(self, n: int = 9):
        import numpy as np

        ramp = np.arange(120, dtype=np.int64).reshape(10, 12) * 2 + 1
        self.images = np.stack([((ramp + 7 * g) % 241).astype(np.uint8) for g in range(n)])
        self.images[:, 0, :] = 0  # an empty first row
        self.labels = np.arange(n) % 3


def test_garment_canvas_masks_align_with_the_garments_placed():
    import numpy as np

    from mimkit.data.segmentation import GarmentCanvas

    src = _Garments()
    ds = GarmentCanvas("train", num_samples=20, canvas_size=(32, 40), max_garments=4, threshold=25,
                       seed=3, garments=src)  # fmt: skip
    assert ds.classes == ["background", "a", "b", "c"] and ds.num_classes == 4
    counts = []
    for i in range(len(ds)):
        image, mask = ds.arrays(i)
        covered = np.zeros(image.shape, dtype=bool)
        layout = ds.layout(i)
        counts.append(len(layout))
        for g, top, left in layout:
            box = (slice(top, top + 10), slice(left, left + 12))
            assert not covered[box].any()  # no overlap
            covered[box] = True
            np.testing.assert_array_equal(image[box], src.images[g])  # the garment itself, in place
            expected = np.where(src.images[g] > 25, src.labels[g] + 1, 0)
            np.testing.assert_array_equal(mask[box], expected)  # its class where it is bright enough
        assert not image[~covered].any() and not mask[~covered].any()  # background elsewhere
        pil, tensor_mask = ds[i]
        np.testing.assert_array_equal(np.asarray(pil), image)
        np.testing.assert_array_equal(tensor_mask.numpy(), mask)
    assert min(counts) >= 1 and max(counts) >= 3


def test_garment_canvas_is_deterministic_per_seed_and_split():
    import numpy as np

    from mimkit.data.segmentation import GarmentCanvas

    def items(split: str, seed: int):
        ds = GarmentCanvas(split, num_samples=5, canvas_size=32, seed=seed, garments=_Garments())
        return [ds.arrays(i) for i in range(5)]

    a, b = items("train", 0), items("train", 0)
    for (ia, ma), (ib, mb) in zip(a, b):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(ma, mb)
    for other in (items("train", 1), items("test", 0)):
        assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, other))


def test_segmentation_folder_round_trip_and_transform(tmp_path):
    import numpy as np
    from PIL import Image

    from mimkit.data.segmentation import (
        DenseTransform,
        GarmentCanvas,
        SegmentationFolder,
        write_segmentation_folder,
    )

    ds = GarmentCanvas("test", num_samples=6, canvas_size=32, seed=0, garments=_Garments())
    write_segmentation_folder(ds, tmp_path / "seg")
    back = SegmentationFolder(tmp_path / "seg")
    assert len(back) == 6 and back.classes == ds.classes
    for i in range(6):
        (img_a, mask_a), (img_b, mask_b) = ds[i], back[i]
        np.testing.assert_array_equal(np.asarray(img_a), np.asarray(img_b))
        assert torch.equal(mask_a, mask_b)
    # The flat layout (NAME.png + NAME_mask.png), no classes.txt: classes up to the largest id.
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(flat / "x.png")
    Image.fromarray(np.full((8, 8), 4, np.uint8)).save(flat / "x_mask.png")
    assert SegmentationFolder(flat).num_classes == 5
    # Resizing moves image and mask together (nearest for the mask); normalisation as given.
    image, mask = DenseTransform(64, 1, (0.5,), (0.5,))(*ds[0])
    assert image.shape == (1, 64, 64) and mask.shape == (64, 64)
    assert torch.equal(mask[::2, ::2], ds[0][1])
    assert float(image.min()) == -1.0


# ------------------------------------------------------------------------------------ segmentation check


def test_a_head_trained_briefly_beats_chance_miou():
    from mimkit.data.segmentation import DenseTransform, GarmentCanvas
    from mimkit.eval.segmentation import (
        DenseData,
        SegmentationConfig,
        confusion,
        segmentation_metrics,
        train_segmentation,
    )

    garments = _Garments()
    garments.images[:, 1:, :] = (garments.labels[:, None, None] + 1) * 80  # the class shows in the intensity

    def data(split: str, n: int) -> DenseData:
        ds = GarmentCanvas(split, num_samples=n, canvas_size=32, seed=0, garments=garments)
        return DenseData(ds, DenseTransform(32, 1, (0.5,), (0.5,)))

    train, test = data("train", 64), data("test", 32)
    # Chance: every pixel called background (the majority class).
    chance = segmentation_metrics(confusion(torch.zeros_like(test.masks), test.masks, 4))["miou"]
    enc = mimkit.create_model("mae_vit_tiny_patch4_32", **SIZES["mae"], in_chans=1).encoder
    for head in ("linear", "fpn"):
        config = SegmentationConfig(head=head, epochs=10, batch_size=16, lr=3e-3, channels=16)
        result = train_segmentation(enc, train, test, 4, config, log=lambda *_: None)
        assert result["train_loss_last"] < result["train_loss_first"]
        assert result["miou"] > 1.5 * chance, (head, result["miou"], chance)


def _probe_like_parser(form: str):
    """A top-level parser whose `probe` command takes `segment` either as a subparser or, as mimkit's probe
    does today, through its positional protocol argument."""
    import argparse

    from mimkit.commands.segment import add_segment_parser

    top = argparse.ArgumentParser(prog="mimkit")
    probe = top.add_subparsers(dest="command").add_parser("probe")
    if form == "subparsers":
        add_segment_parser(probe.add_subparsers(dest="protocol"))
    else:
        probe.add_argument("protocol", choices=["knn", "linear", "attentive"])
        probe.add_argument("--k", type=int, default=20)
        add_segment_parser(probe)
    return top


@pytest.mark.parametrize("form", ["subparsers", "positional"])
def test_probe_segment_command_on_a_folder_of_pairs(tmp_path, form):
    import json

    from mimkit.commands.segment import run_segment
    from mimkit.data.segmentation import GarmentCanvas, write_segmentation_folder

    for split, n in (("train", 24), ("test", 8)):
        write_segmentation_folder(
            GarmentCanvas(split, n, 32, seed=0, garments=_Garments()), tmp_path / "seg" / split
        )
    top = _probe_like_parser(form)
    args = top.parse_args(["probe", "segment", "--random-init", "mae_vit_tiny_patch4_32", "--data", "folder",
                           "--data-path", str(tmp_path / "seg"), "--epochs", "1", "--batch-size", "8",
                           "--channels", "8", "--device", "cpu", "--head", "linear", "--out", str(tmp_path / "out")])  # fmt: skip
    assert args.func is run_segment and args.command == "probe"
    if form == "positional":  # the other protocols still parse as before
        other = top.parse_args(["probe", "knn", "--k", "5"])
        assert other.protocol == "knn" and other.k == 5 and not hasattr(other, "func")
        return  # the run itself is the same function: once is enough
    assert args.func(args) == 0
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["class_names"] == ["background", "a", "b", "c"] and result["img_size"] == [32, 32]
    assert set(result["heads"]) == {"linear"}  # (the FPN head is trained in the test above)
    assert result["heads"]["linear"]["num_test"] == 8 and 0 <= result["heads"]["linear"]["miou"] <= 1
    assert (tmp_path / "out" / "predictions.png").stat().st_size > 0
    assert "| linear mIoU |" in (tmp_path / "out" / "result.md").read_text()


# --------------------------------------------------------------------------- weights for ViTDet / mmseg


@pytest.mark.parametrize("name", ["mae_vit_tiny_patch4_32", "cae_vit_tiny_patch4_32"])
def test_detectron2_weights_give_the_same_blocks_in_a_plain_vit(name):
    """ViTDet's ViT (window_size=0, no relative positions) is timm's block stack without class token, layer
    scale or final norm: the converted weights load strictly into that timm ViT and reproduce mimkit's
    blocks run on the patch tokens alone (CAE's layer scale folded, its q/v bias completed)."""
    from functools import partial

    from mimkit.dense import to_detectron2_vit

    enc = _encoder(name)
    sd = to_detectron2_vit(enc)
    assert not any(k.startswith(("cls_token", "norm.")) or "gamma" in k or "ls1" in k for k in sd)
    assert sd["pos_embed"].shape == (1, 1 + 64, 32)  # class row kept: pretrain_use_cls_token=True
    plain = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=0, class_token=False,
        global_pool="avg", final_norm=False, fc_norm=False, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
    ).eval()  # fmt: skip
    plain.load_state_dict({**sd, "pos_embed": sd["pos_embed"][:, 1:]}, strict=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        theirs = plain.forward_intermediates(images, output_fmt="NLC", intermediates_only=True)
        x = enc.embed(images)  # [B, L, D] patch tokens + position, no class token
        for block, t in zip(enc.blocks, theirs, strict=True):
            x = block(x)
            torch.testing.assert_close(t, x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["mae_vit_tiny_patch4_32", "cae_vit_tiny_patch4_32"])
def test_mmseg_mae_backbone_gives_mimkit_block_outputs(name):
    """Runs where mmsegmentation (with mmcv) is installed; see docs/dense.md."""
    mmseg_backbones = pytest.importorskip("mmseg.models.backbones")
    from mimkit.dense import to_mmseg_vit

    enc = _encoder(name)
    net = mmseg_backbones.MAE(img_size=32, patch_size=4, embed_dims=32, num_layers=3, num_heads=2,
                              out_indices=[0, 1, 2], norm_cfg=dict(type="LN", eps=1e-6), final_norm=False,
                              init_values=1.0)  # fmt: skip
    net.eval()  # (mmseg's BEiT.train returns None: no chaining)
    missing, unexpected = net.load_state_dict(to_mmseg_vit(enc), strict=False)
    assert not unexpected and all("relative_position" in k for k in missing)
    for layer in net.layers:  # zero tables, as mmseg's MAE initialises them: no relative position bias
        torch.nn.init.zeros_(layer.attn.relative_position_bias_table)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = enc.forward_intermediates(images, intermediates_only=True)
        theirs = net(images)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def test_tune_blocks_trains_the_last_blocks_and_nothing_before():
    from mimkit.data.segmentation import DenseTransform, GarmentCanvas
    from mimkit.eval.segmentation import DenseData, SegmentationConfig, train_segmentation, tuned_parameters

    enc = _encoder("mae_vit_tiny_patch4_32", in_chans=1)
    names = {id(p): n for n, p in enc.named_parameters()}
    picked = sorted(names[id(p)] for p in tuned_parameters(enc, 1))
    assert picked and all(n.startswith(("blocks.2.", "norm.")) for n in picked)
    assert {n.split(".")[0] for n in picked} == {"blocks", "norm"}
    conv = _encoder("convmae_tiny_patch8_64")
    conv_names = {id(p): n for n, p in conv.named_parameters()}
    assert all(conv_names[id(p)].startswith(("blocks3.2.", "norm.", "stage1_output_decode", "stage2_output_decode"))
               for p in tuned_parameters(conv, 1))  # fmt: skip

    ds = GarmentCanvas("train", 8, 32, seed=0, garments=_Garments())
    data = DenseData(ds, DenseTransform(32, 1, (0.5,), (0.5,)))
    before = {n: p.detach().clone() for n, p in enc.named_parameters()}
    flags = {n: p.requires_grad for n, p in enc.named_parameters()}
    train_segmentation(enc, data, data, 4, SegmentationConfig(head="linear", epochs=1, batch_size=4, tune_blocks=1,
                                                               encoder_lr=1e-2), log=lambda *_: None)  # fmt: skip
    changed = {n for n, p in enc.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(picked)
    assert flags == {n: p.requires_grad for n, p in enc.named_parameters()}  # left as it was


def test_lr_sweep_chooses_on_held_out_training_images():
    from mimkit.data.segmentation import DenseTransform, GarmentCanvas
    from mimkit.dense import PixelEncoder
    from mimkit.eval.segmentation import DenseData, SegmentationConfig, train_segmentation

    ds = GarmentCanvas("train", 20, 32, seed=0, garments=_Garments())
    data = DenseData(ds, DenseTransform(32, 1, (0.5,), (0.5,)))
    config = SegmentationConfig(head="linear", epochs=2, batch_size=6, lrs=(1e-4, 3e-2), val_fraction=0.2)
    result = train_segmentation(PixelEncoder(4, 1), data, data, 4, config, log=lambda *_: None)
    assert result["num_train"] == 16 and result["num_val"] == 4
    assert set(result["val_miou"]) == {"0.0001", "0.03"}
    assert result["lr"] == max((v, float(k)) for k, v in result["val_miou"].items())[1]
    with pytest.raises(ValueError, match="frozen encoder"):
        enc = _encoder("mae_vit_tiny_patch4_32", in_chans=1)
        train_segmentation(enc, data, data, 4, SegmentationConfig(lrs=(1e-3, 1e-2), tune_blocks=1))
