"""Import / export round trips with real peer code built from configs (transformers, timm), no downloads."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

import mimkit
from mimkit.cli import main as cli
from mimkit.engine.checkpoint import load_checkpoint, model_from_checkpoint, save_model
from mimkit.interop import export_hf, export_safetensors, export_timm, import_checkpoint, resize_pos_embed
from mimkit.interop.hf import mae_to_hf_state_dict, noise_for_mask

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

# Standard head counts for the widths (192 -> 3 heads; decoder 128 -> 4), so import infers them.
MAE_SMALL = dict(
    embed_dim=192, depth=2, num_heads=3, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4
)


def _perturb(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _mae(**kw) -> torch.nn.Module:
    return _perturb(mimkit.create_model("mae_vit_tiny_patch4_32", **{**MAE_SMALL, **kw}))


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module, images: torch.Tensor, mask: torch.Tensor) -> None:
    with torch.no_grad():
        oa, ob = a.eval()(images, mask=mask), b.eval()(images, mask=mask)
    torch.testing.assert_close(oa.pred, ob.pred, atol=1e-6, rtol=0)
    torch.testing.assert_close(oa.loss, ob.loss, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------- HF


def test_export_hf_directory_loads_in_transformers_and_matches(tmp_path):
    model = _mae(norm_pix_loss=True)
    save_model(model, tmp_path / "ckpt.pt")
    out = export_hf(tmp_path / "ckpt.pt", tmp_path / "hf")
    assert sorted(os.listdir(out)) == [
        "README.md", "config.json", "mimkit.json", "model.safetensors", "preprocessor_config.json"
    ]  # fmt: skip
    processor = transformers.AutoImageProcessor.from_pretrained(out)  # the preprocessing travels along
    assert processor.size == {"shortest_edge": 32} and processor.crop_pct == 1.0
    assert tuple(processor.image_mean) == pytest.approx((0.485, 0.456, 0.406))
    assert "mae" in (out / "README.md").read_text().lower()

    enc, info = transformers.ViTMAEModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"]  # (the decoder's tensors are reported unexpected, as for released ones)
    assert all(k.startswith("decoder.") for k in info["unexpected_keys"])
    full, info = transformers.ViTMAEForPreTraining.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys")
    assert full.config.layer_norm_eps == 1e-6 and full.config.norm_pix_loss

    images = torch.randn(2, 3, 32, 32)
    mask = model.mask_generator(2, torch.Generator().manual_seed(0))
    noise = noise_for_mask(mask, torch.Generator().manual_seed(1))
    from mimkit.interop.hf import hf_visible_to_grid_order

    with torch.no_grad():
        ours = model(images, mask=mask)
        theirs = full.eval()(pixel_values=images, noise=noise)
        feats = enc.eval()(pixel_values=images, noise=noise).last_hidden_state
    torch.testing.assert_close(theirs.loss, ours.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs.logits, ours.pred, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        hf_visible_to_grid_order(feats, noise), model.forward_encoder(images, mask), atol=1e-5, rtol=0
    )


def test_import_hf_directory_keeps_its_eps_and_reproduces_outputs(tmp_path):
    # A ViTMAE saved by transformers itself, with Hugging Face's default LayerNorm eps (1e-12).
    cfg = transformers.ViTMAEConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=1, intermediate_size=256, image_size=32,
        patch_size=8, decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=1,
        decoder_intermediate_size=128, norm_pix_loss=True, attn_implementation="eager",
    )  # fmt: skip
    hf = _perturb(transformers.ViTMAEForPreTraining(cfg))
    hf.save_pretrained(tmp_path / "hf")
    ckpt = import_checkpoint(tmp_path / "hf", source="hf")
    assert ckpt["model_config"]["norm_eps"] == 1e-12
    model = model_from_checkpoint(ckpt).eval()

    images = torch.randn(2, 3, 32, 32)
    mask = model.mask_generator(2, torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(images, mask=mask)
        theirs = hf(pixel_values=images, noise=noise_for_mask(mask))
    torch.testing.assert_close(ours.pred, theirs.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=0)

    # The on-disk names of released checkpoints (query/key/value split) in a pytorch_model.bin also import.
    legacy_dir = tmp_path / "legacy"
    legacy_dir.mkdir()
    (legacy_dir / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    torch.save(mae_to_hf_state_dict(model.state_dict(), "legacy"), legacy_dir / "pytorch_model.bin")
    again = model_from_checkpoint(import_checkpoint(legacy_dir, source="hf"))
    _same_outputs(model, again, images, mask)


# ------------------------------------------------------------------------------------------------ timm


@pytest.mark.parametrize("img_size", [None, 48])
def test_export_timm_vit_loads_with_pretrained_file_and_matches(tmp_path, img_size):
    model = _mae()
    save_model(model, tmp_path / "ckpt.pt")
    info = export_timm(tmp_path / "ckpt.pt", tmp_path / "enc", img_size=img_size)
    ref = timm.create_model(
        info["timm_name"], pretrained=True, pretrained_cfg_overlay=dict(file=info["file"]), num_classes=0,
        **info["timm_kwargs"],
    ).eval()  # fmt: skip
    if img_size is None:
        images = torch.randn(2, 3, 32, 32)
        expected = model.encoder.forward_features(images)
    else:
        # A mimkit encoder at the new size holding the resized position embedding gives the same features.
        images = torch.randn(2, 3, 48, 48)
        resized = mimkit.create_model("mae_vit_tiny_patch4_32", **MAE_SMALL, img_size=48).encoder.eval()
        sd = model.encoder.state_dict()
        sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], (8, 8), (12, 12))
        resized.load_state_dict(sd)
        expected = resized.forward_features(images)
    with torch.no_grad():
        torch.testing.assert_close(ref.forward_features(images), expected, atol=1e-5, rtol=0)


def test_resize_pos_embed_is_bicubic_and_keeps_class_row():
    pos = torch.randn(1, 1 + 8 * 6, 16)
    out = resize_pos_embed(pos, (8, 6), (12, 9))
    assert out.shape == (1, 1 + 12 * 9, 16)
    assert torch.equal(out[:, :1], pos[:, :1])
    from timm.layers import resample_abs_pos_embed

    ref = resample_abs_pos_embed(
        pos, (12, 9), (8, 6), num_prefix_tokens=1, interpolation="bicubic", antialias=False
    )
    torch.testing.assert_close(out, ref)
    assert resize_pos_embed(pos, (8, 6), (8, 6)) is pos


def test_export_timm_beit_for_cae(tmp_path):
    model = _perturb(
        mimkit.create_model("cae_vit_tiny_patch4_32", depth=2, regressor_depth=1, decoder_depth=1)
    )
    save_model(model, tmp_path / "cae.pt")
    info = export_timm(tmp_path / "cae.pt", tmp_path / "cae_enc")
    assert info["timm_name"].startswith("beit_")
    ref = timm.create_model(
        info["timm_name"], pretrained=True, pretrained_cfg_overlay=dict(file=info["file"]), num_classes=0,
        **info["timm_kwargs"],
    ).eval()  # fmt: skip
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            ref.forward_features(images), model.encoder.forward_features(images), atol=1e-5, rtol=0
        )


def test_export_safetensors_with_json_config(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    model = _mae()
    save_model(model, tmp_path / "ckpt.pt")
    path = export_safetensors(tmp_path / "ckpt.pt", tmp_path / "plain")
    meta = json.loads(path.with_suffix(".json").read_text())
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["mimkit"]) == meta
    rebuilt = mimkit.create_model(meta["model_name"], **meta["model_config"])
    rebuilt.load_state_dict(load_file(str(path)), strict=True)
    _same_outputs(model, rebuilt, torch.randn(2, 3, 32, 32), model.mask_generator(2))


# ---------------------------------------------------------------------------------------- official layouts


def _official_mae_file(model, path, with_decoder: bool = True, **args):
    """A checkpoint as the authors' training script writes it: timm encoder names at the top level,
    decoder_* / mask_token, plus optimizer state, epoch and a pickled argparse.Namespace."""
    sd = {}
    for key, value in model.state_dict().items():
        if key.startswith("encoder."):
            sd[key[len("encoder.") :]] = value  # cls_token, pos_embed, patch_embed.proj.*, blocks.N.*, norm.*
        elif with_decoder:
            sd[key] = (
                value  # mask_token, decoder_embed, decoder_pos_embed, decoder_blocks.N, decoder_norm/pred
            )
    assert "blocks.0.attn.qkv.weight" in sd and "cls_token" in sd
    ckpt = {
        "model": sd,
        "epoch": 399,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
    }
    ckpt["args"] = argparse.Namespace(model="mae_vit_custom", input_size=32, output_dir="./out", **args)
    torch.save(ckpt, path)


def test_import_official_mae_reproduces_source_outputs(tmp_path):
    source = _mae(norm_pix_loss=False, mask_ratio=0.6)
    _official_mae_file(source, tmp_path / "mae.pth", norm_pix_loss=False, mask_ratio=0.6)
    ckpt = import_checkpoint(tmp_path / "mae.pth", source="mae")
    assert ckpt["model_config"]["norm_pix_loss"] is False and ckpt["model_config"]["mask_ratio"] == 0.6
    assert ckpt["imported_from"]["initialised"] == []
    imported = model_from_checkpoint(ckpt)
    images = torch.randn(2, 3, 32, 32)
    _same_outputs(source, imported, images, source.mask_generator(2, torch.Generator().manual_seed(0)))


def test_import_official_mae_encoder_only_release(tmp_path):
    source = _mae()
    _official_mae_file(source, tmp_path / "enc.pth", with_decoder=False, norm_pix_loss=True)
    with pytest.warns(UserWarning, match="fresh initialisation"):
        ckpt = import_checkpoint(
            tmp_path / "enc.pth", source="mae", encoder_only=True, decoder_embed_dim=128, decoder_num_heads=4
        )
    assert any(k.startswith("decoder_blocks.") for k in ckpt["imported_from"]["initialised"])
    imported = model_from_checkpoint(ckpt).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            imported.encoder.forward_features(images), source.encoder.forward_features(images)
        )


class _Payload:
    """Unpickling this calls os.system, which would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    source = _mae()
    bad = {
        "model": {k.removeprefix("encoder."): v for k, v in source.state_dict().items()},
        "args": _Payload(marker),
    }
    torch.save(bad, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="refusing to load .*os.system|refusing to load .*posix.system"):
        import_checkpoint(tmp_path / "evil.pth", source="mae")
    assert not marker.exists()
    assert cli(["import", "--from", "mae", str(tmp_path / "evil.pth"), "--out", str(tmp_path / "x.pt")]) == 2
    assert not marker.exists() and not (tmp_path / "x.pt").exists()
    # The payload is live: an unrestricted load would have run it (proves the test can fail).
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert marker.exists()


def _official_cae_state_dict(model, layout: str) -> dict:
    """mimkit CAE -> the authors' names. Both layouts: encoder.* BEiT blocks with gamma_1/gamma_2, regressor
    blocks (norm1_q/k/v, cross_attn.{q,k,v,proj}, cross_attn.q_bias/v_bias, gamma_1_cross, norm2_cross,
    mlp_cross, gamma_2_cross), mask_token. "current": alignment_encoder.*, regresser.{regressor_blocks.N, norm},
    decoder.{decoder_blocks.N, norm, head}, rd_pos_embed. "older": teacher.*, pretext_neck.{regressor_blocks.N,
    norm, decoder_blocks.N, norm2, head} and no rd_pos_embed (the encoder's table)."""
    current = layout == "current"
    prefix = {
        "regressor_blocks.": "regresser.regressor_blocks." if current else "pretext_neck.regressor_blocks.",
        "regressor_norm.": "regresser.norm." if current else "pretext_neck.norm.",
        "decoder_blocks.": "decoder.decoder_blocks." if current else "pretext_neck.decoder_blocks.",
        "decoder_norm.": "decoder.norm." if current else "pretext_neck.norm2.",
        "decoder_pred.": "decoder.head." if current else "pretext_neck.head.",
    }
    out = {}
    for key, value in model.state_dict().items():
        name = key.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")
        if key.startswith("encoder."):
            out[name] = value
            out[("alignment_encoder." if current else "teacher.") + name[len("encoder.") :]] = value.clone()
        elif key.startswith("regressor_blocks."):
            name = key
            for ours, theirs in [
                (".norm_q.", ".norm1_q."), (".norm_k.", ".norm1_k."), (".norm_v.", ".norm1_v."),
                (".attn.q.bias", ".cross_attn.q_bias"), (".attn.v.bias", ".cross_attn.v_bias"),
                (".attn.", ".cross_attn."), (".ls1.gamma", ".gamma_1_cross"), (".ls2.gamma", ".gamma_2_cross"),
                (".norm2.", ".norm2_cross."), (".mlp.", ".mlp_cross."),
            ]:  # fmt: skip
                name = name.replace(ours, theirs)
            out[prefix["regressor_blocks."] + name[len("regressor_blocks.") :]] = value
        elif key == "mask_token" or (key == "rd_pos_embed" and current):
            out[key] = value
        else:
            start = next((p for p in prefix if key.startswith(p)), None)
            if start is not None:
                out[prefix[start] + name[len(start) :]] = value
    return out


@pytest.mark.parametrize("layout", ["current", "older"])
def test_import_official_cae_reproduces_source_outputs(tmp_path, layout):
    source = _perturb(
        mimkit.create_model(
            "cae_vit_tiny_patch4_32", depth=2, regressor_depth=2, decoder_depth=1, norm_pix_loss=False
        )
    )
    if layout == "older":
        with torch.no_grad():  # the older layout has no rd_pos_embed: the authors rebuilt the encoder's table
            source.rd_pos_embed.copy_(source.encoder.pos_embed)
    args = argparse.Namespace(
        decoder_num_heads=3, regressor_depth=2, decoder_depth=1, base_momentum=0.0, norm_pix_loss=False
    )
    official = _official_cae_state_dict(source, layout)
    torch.save({"model": official, "epoch": 1, "args": args}, tmp_path / "cae.pth")
    ckpt = import_checkpoint(tmp_path / "cae.pth", source="cae")
    teacher = "alignment_encoder." if layout == "current" else "teacher."
    assert ckpt["imported_from"]["initialised"] == []
    assert {k for k in official if k not in ckpt["imported_from"]["dropped"]} == {
        k for k in official if not k.startswith(teacher)
    }  # every tensor but the momentum-0 teacher copy is used
    imported = model_from_checkpoint(ckpt)
    images = torch.randn(2, 3, 32, 32)
    _same_outputs(source, imported, images, source.mask_generator(2, torch.Generator().manual_seed(0)))


def test_import_cae_refuses_missing_or_unknown_tensors_unless_encoder_only(tmp_path):
    source = _perturb(
        mimkit.create_model("cae_vit_tiny_patch4_32", depth=2, regressor_depth=1, decoder_depth=1)
    )
    official = _official_cae_state_dict(source, "current")
    partial = {k: v for k, v in official.items() if not k.startswith("decoder.")}
    torch.save({"model": partial}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"lacks \d+ tensors .*decoder_norm.*--encoder-only"):
        import_checkpoint(tmp_path / "partial.pth", source="cae")
    torch.save({"model": {**official, "extra_head.weight": torch.zeros(3)}}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="extra_head.weight"):
        import_checkpoint(tmp_path / "odd.pth", source="cae")
    encoder = {k.removeprefix("encoder."): v for k, v in official.items() if k.startswith("encoder.")}
    torch.save({"model": encoder}, tmp_path / "encoder.pth")
    with pytest.raises(ValueError, match="--encoder-only"):
        import_checkpoint(tmp_path / "encoder.pth", source="cae")
    with pytest.warns(UserWarning, match="fresh initialisation"):
        ckpt = import_checkpoint(tmp_path / "encoder.pth", source="cae", encoder_only=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model_from_checkpoint(ckpt).encoder.eval()(x), source.encoder.eval()(x), atol=1e-6, rtol=0
        )
    out = tmp_path / "x.pt"
    assert cli(["import", "--from", "cae", str(tmp_path / "partial.pth"), "--out", str(out)]) == 2
    assert not out.exists()
    assert (
        cli(["import", "--from", "cae", str(tmp_path / "encoder.pth"), "--out", str(out), "--encoder-only"])
        == 0
    )


def test_import_official_convmae_reproduces_source_outputs(tmp_path):
    source = _perturb(mimkit.create_model("convmae_tiny_patch8_64"))
    # The authors' layout: encoder tensors at the top level (patch_embed1..4, blocks1..3, pos_embed,
    # stage1/2_output_decode, norm), decoder tensors as MAE's.
    official = {k.removeprefix("encoder."): v for k, v in source.state_dict().items()}
    assert {"patch_embed4.weight", "blocks3.0.attn.qkv.weight", "stage1_output_decode.weight"} <= set(
        official
    )
    torch.save(
        {"model": official, "args": argparse.Namespace(norm_pix_loss=True, mask_ratio=0.75)},
        tmp_path / "c.pth",
    )
    imported = model_from_checkpoint(import_checkpoint(tmp_path / "c.pth", source="convmae"))
    images = torch.randn(2, 3, 64, 64)
    _same_outputs(source, imported, images, source.mask_generator(2, torch.Generator().manual_seed(0)))


def test_cli_import_then_export_hf(tmp_path, capsys):
    source = _mae()
    _official_mae_file(source, tmp_path / "mae.pth", norm_pix_loss=True, mask_ratio=0.75)
    assert cli(["import", "--from", "mae", str(tmp_path / "mae.pth"), "--out", str(tmp_path / "m.pt")]) == 0
    assert load_checkpoint(tmp_path / "m.pt")["model_name"].startswith("mae_")
    assert (
        cli(
            [
                "export",
                "--format",
                "hf",
                "--checkpoint",
                str(tmp_path / "m.pt"),
                "--out",
                str(tmp_path / "hf"),
            ]
        )
        == 0
    )
    hf, info = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"]
    assert cli(["export", "--format", "hf", "--checkpoint", str(tmp_path / "m.pt"), "--out", str(tmp_path / "hf64"),
                "--img-size", "64"]) == 0  # fmt: skip
    big = transformers.ViTMAEModel.from_pretrained(tmp_path / "hf64")
    assert big.config.image_size == 64
    assert big.embeddings.position_embeddings.shape == (1, 1 + 16 * 16, 192)
