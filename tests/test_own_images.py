"""Your own photos, end to end, as a newcomer runs it: a folder of real photos (scikit-image's samples) in class
subfolders, plus a loose image and a corrupt file -> pretrain (MAE, CAE, ConvMAE) -> visualize -> probe on an
honest held-out split -> export -> load with timm / Hugging Face from another directory -> the same features."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import mimkit
from mimkit.cli import main as cli
from mimkit.data.folder import labelled_splits, stratified_holdout

skdata = pytest.importorskip("skimage.data")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

# the corrupt file is reported once per process, then skipped: expected here
pytestmark = pytest.mark.filterwarnings("ignore:skipping unreadable image:RuntimeWarning")

RECIPE = os.path.join(os.path.dirname(__file__), "..", "configs", "mae_photos_cpu.yaml")
PER_CLASS = 5


def _gray3(img: np.ndarray) -> np.ndarray:
    return np.stack([img] * 3, axis=-1)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """4 classes x 5 photos (random crops, 40-48 px, non-square), a loose image at the root, a corrupt file."""
    root = tmp_path_factory.mktemp("photos")
    sources = {
        "cat": [skdata.chelsea()],
        "coffee": [skdata.coffee()],
        "rocket": [skdata.rocket()],
        "texture": [_gray3(skdata.brick()), _gray3(skdata.grass()), _gray3(skdata.gravel())],
    }
    rng = np.random.default_rng(0)
    for name, images in sources.items():
        (root / name).mkdir()
        for i in range(PER_CLASS):
            img = images[i % len(images)]
            h, w = img.shape[:2]
            side = int(min(h, w) * rng.uniform(0.6, 1.0))
            y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            crop = Image.fromarray(img[y : y + side, x : x + side]).resize((48, 40), Image.BICUBIC)
            crop.save(root / name / f"{name}_{i}.jpg", quality=92)
    Image.fromarray(skdata.astronaut()).resize((48, 48)).save(root / "loose.jpg")
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


# ------------------------------------------------------------------------------------ honest evaluation


def test_stratified_holdout_is_seeded_per_class_and_skips_unlabelled():
    labels = [0] * 10 + [1] * 5 + [-1] * 3
    train, test = stratified_holdout(labels, 0.2, seed=0)
    assert sorted(labels[i] for i in test) == [0, 0, 1]  # 20% of each class, at least one
    assert not set(train) & set(test) and len(train) + len(test) == 15  # unlabelled in neither
    assert stratified_holdout(labels, 0.2, seed=0) == (train, test)
    assert stratified_holdout(labels, 0.2, seed=1) != (train, test)


def test_folder_without_splits_gets_a_held_out_test_set(photos):
    train, test, how = labelled_splits(photos, in_chans=3, seed=0)
    assert how["kind"] == "holdout" and how["seed"] == 0 and how["skipped_unlabelled"] == 1
    train_files = {p for p, _ in train.samples}
    test_files = {p for p, _ in test.samples}
    assert not train_files & test_files  # never scored on what it trained on
    assert all(label >= 0 for _, label in train.samples + test.samples)  # the loose image is skipped
    assert len(test) == 4 and how["num_test"] == 4 and how["num_train"] == len(train) == 17  # 1 of each class


def test_folder_with_train_and_test_uses_them_with_one_class_list(tmp_path):
    for split, classes in (("train", ("a", "b", "c")), ("test", ("a", "c"))):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / split / c / "x.png")
    train, test, how = labelled_splits(tmp_path)
    assert how["kind"] == "folders" and (len(train), len(test)) == (3, 2)
    assert [label for _, label in test.samples] == [0, 2]  # "c" keeps its training label


def test_too_few_images_per_class_is_refused_with_the_fix(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for name in ("a/1.png", "a/2.png", "b/1.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    with pytest.raises(ValueError, match=r"\['b'\].*fewer than 2.*train/<class>"):
        labelled_splits(tmp_path)
    (tmp_path / "b" / "1.png").rename(tmp_path / "loose.png")
    (tmp_path / "b").rmdir()
    (tmp_path / "a" / "1.png").rename(tmp_path / "other.png")
    (tmp_path / "a" / "2.png").rename(tmp_path / "third.png")
    (tmp_path / "a").rmdir()
    with pytest.raises(ValueError, match="no class subfolders"):
        labelled_splits(tmp_path)


# ----------------------------------------------------------------------------------------- end to end

TINY_VIT = [
    "model.img_size=32",
    "model.patch_size=4",
    "model.embed_dim=32",
    "model.depth=1",
    "model.num_heads=2",
]
COMMON = ["data.batch_size=8", "data.num_workers=0", "train.max_steps=3", "optim.warmup_steps=1",
          "train.precision=fp32", "train.progress=false", "train.matmul_ceiling=1e12", "train.log_every=1"]  # fmt: skip
METHODS = {
    "mae": ["--config", RECIPE, *TINY_VIT, "model.decoder_embed_dim=32", "model.decoder_depth=1",
            "model.decoder_num_heads=2"],
    "cae": ["--config", RECIPE, "model.name=cae_vit_tiny_patch4_32", *TINY_VIT, "model.regressor_depth=1",
            "model.decoder_depth=1"],
    "convmae": ["model.name=convmae_tiny_patch8_64", "model.img_size=32", "model.embed_dims=[16,16,32]",
                "model.depths=[1,1,1]", "model.num_heads=2", "model.decoder_embed_dim=32",
                "model.decoder_depth=1", "model.decoder_num_heads=2", "model.in_chans=3"],
}  # fmt: skip


def _features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[B, D]: the class token, or the mean of the patch tokens for an encoder without one (ConvMAE)."""
    encoder = getattr(model, "encoder", model)
    with torch.no_grad():
        tokens = encoder.forward_features(images)
    return tokens[:, 0] if getattr(encoder, "num_prefix_tokens", 0) else tokens.mean(dim=1)


@pytest.mark.parametrize("method", list(METHODS))
def test_own_photos_end_to_end(method, photos, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    argv = [
        "pretrain",
        *METHODS[method],
        f"data.path={photos}",
        "data.source=folder",
        f"train.output_dir={run}",
    ]
    assert cli([*argv, *COMMON]) == 0
    assert (run / "checkpoint.pt").is_file() and (run / "encoder.safetensors").is_file()

    # visualize: the picture lands beside the checkpoint, whatever the working directory
    monkeypatch.chdir(tmp_path)
    (run / "reconstructions.png").unlink(missing_ok=True)
    assert cli(["visualize", "--checkpoint", str(run / "checkpoint.pt"), "--num-images", "2"]) == 0
    assert (run / "reconstructions.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "reconstructions.png").exists()

    # probe: no --data, so the folder it was trained on, with a held-out split said in the summary
    capsys.readouterr()
    assert cli(["probe", "knn", "--checkpoint", str(run / "checkpoint.pt"), "--no-progress"]) == 0
    summary = capsys.readouterr().out
    result = json.loads((run / "probe_knn" / "result.json").read_text())
    assert result["split"]["kind"] == "holdout" and result["split"]["seed"] == 0
    assert (
        result["num_test"] == 4 and result["num_train"] == 17 and result["split"]["skipped_unlabelled"] == 1
    )
    assert "held-out test split: 4 of 21 labelled images" in summary and "train_split" not in summary
    assert (
        "warning: only 4 test images" in summary and "pretrained (without labels) on this folder" in summary
    )
    # the encoder file probes too, to the same figure
    assert cli(["probe", "knn", "--checkpoint", str(run / "encoder.safetensors"), "--out", str(tmp_path / "enc"),
                "--no-progress"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "enc" / "result.json").read_text())["accuracy"] == result["accuracy"]

    # reference features: mimkit's own model and eval transform on photos of several aspect ratios
    model, transform = mimkit.load(run / "checkpoint.pt", eval_transform=True)
    pil = [Image.open(photos / "coffee" / "coffee_0.jpg"), Image.open(photos / "loose.jpg")]
    images = torch.stack([transform(im) for im in pil])  # [2, 3, 32, 32]
    expected = _features(model, images)
    for loaded in (mimkit.load(run / "encoder.safetensors"), mimkit.load(run)):
        torch.testing.assert_close(_features(loaded, images), expected, atol=1e-5, rtol=0)

    export = tmp_path / "export"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if method == "convmae":  # no timm / HF architecture: safetensors + mimkit.load, and errors that say so
        for fmt in ("timm", "hf"):
            assert cli(["export", "--format", fmt, "--checkpoint", str(run / "checkpoint.pt"), "--out",
                        str(export / fmt)]) == 2  # fmt: skip
            assert "--format safetensors" in capsys.readouterr().err
        assert cli(["export", "--format", "safetensors", "--checkpoint", str(run / "checkpoint.pt"), "--out",
                    str(export / "convmae")]) == 0  # fmt: skip
        monkeypatch.chdir(elsewhere)
        again = mimkit.load(export / "convmae.safetensors")
        torch.testing.assert_close(_features(again, images), expected, atol=1e-5, rtol=0)
        return

    assert (
        cli(["export", "--format", "timm", "--checkpoint", "run/checkpoint.pt", "--out", "export/enc"]) == 0
    )
    monkeypatch.chdir(elsewhere)  # the JSON's paths must not depend on where export ran
    info = json.loads((export / "enc.json").read_text())
    net = timm.create_model(info["timm_name"], pretrained=True, pretrained_cfg_overlay=info["pretrained_cfg_overlay"],
                            **info["timm_kwargs"]).eval()  # fmt: skip
    data_cfg = timm.data.resolve_data_config(model=net)
    assert tuple(data_cfg["input_size"]) == (3, 32, 32) and data_cfg["interpolation"] == "bicubic"
    assert data_cfg["mean"] == pytest.approx((0.485, 0.456, 0.406)) and data_cfg["crop_pct"] == 1.0
    timm_images = torch.stack([timm.data.create_transform(**data_cfg)(im) for im in pil])
    torch.testing.assert_close(timm_images, images, atol=1.01 / 255 / 0.224, rtol=0)  # one 8-bit level
    with torch.no_grad():
        torch.testing.assert_close(net.forward_features(images)[:, 0], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(_features(mimkit.load(export / "enc.safetensors"), images), expected, atol=1e-5,
                               rtol=0)  # fmt: skip
    if method == "cae":
        assert (
            cli(["export", "--format", "hf", "--checkpoint", str(run / "checkpoint.pt"), "--out", "hf"]) == 2
        )
        assert "--format timm" in capsys.readouterr().err
        return

    monkeypatch.chdir(tmp_path)
    assert cli(["export", "--format", "hf", "--checkpoint", "run/checkpoint.pt", "--out", "export/hf"]) == 0
    monkeypatch.chdir(elsewhere)
    card = (export / "hf" / "README.md").read_text()
    assert "MAE" in card and "optimizer steps: 3" in card and "knn:" in card and "held-out" in card
    processor = transformers.AutoImageProcessor.from_pretrained(export / "hf")
    hf = transformers.AutoModel.from_pretrained(export / "hf", mask_ratio=0.0).eval()
    pixels = processor(pil, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, images, atol=1.01 / 255 / 0.224, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(
            hf(pixel_values=images).last_hidden_state[:, 0], expected, atol=1e-5, rtol=0
        )
    torch.testing.assert_close(_features(mimkit.load(export / "hf"), images), expected, atol=1e-5, rtol=0)


def test_finetuned_classifier_loads_and_exports(photos, tmp_path, capsys):
    from mimkit.engine.checkpoint import save_model

    tiny = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
                decoder_depth=1, decoder_num_heads=2)  # fmt: skip
    save_model(mimkit.create_model("mae_vit_tiny_patch4_32", **tiny), tmp_path / "checkpoint.pt")
    out = tmp_path / "ft"
    argv = ["finetune", "--checkpoint", str(tmp_path / "checkpoint.pt"), "--data", "folder", "--data-path",
            str(photos), "--epochs", "1", "--batch-size", "8", "--no-progress", "--out", str(out)]  # fmt: skip
    assert cli(argv) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["split"]["kind"] == "holdout" and result["num_test"] == 4  # the same split as the probes
    clf = mimkit.load(out / "classifier.pt")
    assert clf.class_names == ["cat", "coffee", "rocket", "texture"]
    transform = mimkit.load(out / "classifier.pt", eval_transform=True)[1]
    images = torch.stack([transform(Image.open(photos / "rocket" / f"rocket_{i}.jpg")) for i in range(2)])
    with torch.no_grad():
        logits = clf(images)  # [2, 4]
    assert logits.shape == (2, 4)
    assert cli(["export", "--format", "timm", "--checkpoint", str(out / "classifier.pt"), "--out", "x"]) == 2
    assert "--format safetensors" in capsys.readouterr().err  # and says why timm cannot hold it
    exported = out / "classifier_export"
    assert cli(["export", "--format", "safetensors", "--checkpoint", str(out / "classifier.pt"), "--out",
                str(exported)]) == 0  # fmt: skip
    again = mimkit.load(exported.with_suffix(".safetensors"))
    assert again.class_names == clf.class_names
    with torch.no_grad():
        torch.testing.assert_close(again(images), logits, atol=1e-6, rtol=0)
    assert cli(["probe", "knn", "--checkpoint", str(out / "classifier.pt"), "--data", "folder", "--data-path",
                str(photos), "--no-progress", "--out", str(tmp_path / "probe")]) == 0  # fmt: skip


def test_pretrain_checks_catch_grayscale_training_of_colour_photos_short_warmup_and_tiny_data(photos):
    from mimkit.data import ImageFolder
    from mimkit.data.checks import no_batch_message, pretrain_warnings

    folder = ImageFolder(photos, in_chans=1)
    warnings_ = pretrain_warnings(
        folder, in_chans=1, batch_size=8, world_size=1, total_steps=3, warmup_steps=40
    )
    assert any("model.in_chans=3" in w for w in warnings_)
    assert any("never reaches its peak" in w and "optim.warmup_steps" in w for w in warnings_)
    assert any(f"only {len(folder)} images" in w for w in warnings_)
    colour = ImageFolder(photos, in_chans=3)
    assert not pretrain_warnings(colour, 3, 8, 1, total_steps=100, warmup_steps=10, min_images=10)
    assert "data.batch_size=22" in no_batch_message(len(colour), batch_size=64)
    assert no_batch_message(len(colour), batch_size=16) is None


def test_names_say_what_was_built_and_foreign_files_get_a_fix(tmp_path):
    from mimkit.interop.loading import display_name

    assert display_name("mae_vit_tiny_patch4_32", dict(img_size=64, patch_size=8, depth=6)) == (
        "mae_vit_tiny_patch8_64_depth6"
    )
    assert display_name("mae_vit_tiny_patch4_32", dict(in_chans=1)) == "mae_vit_tiny_patch4_32_1ch"
    assert display_name("convmae_tiny_patch8_64", {}) == "convmae_tiny_patch8_64"
    torch.save({"model": {"cls_token": torch.zeros(1)}}, tmp_path / "foreign.pth")
    with pytest.raises(ValueError, match="mimkit import --from"):
        mimkit.load(tmp_path / "foreign.pth")


def test_draft_decoding_shrinks_big_jpegs_but_never_below_the_asked_size(tmp_path):
    from mimkit.data import ImageFolder

    Image.fromarray(skdata.astronaut()).resize((1600, 1200)).save(tmp_path / "big.jpg")
    assert ImageFolder(tmp_path)[0][0].size == (1600, 1200)
    assert ImageFolder(tmp_path, draft_size=256)[0][0].size == (400, 300)  # 1/4: both sides still >= 256


def test_run_pictures_and_config_go_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from mimkit.viz.tensorboard import log_run_pictures

    Image.new("RGB", (20, 10), (200, 10, 10)).save(tmp_path / "reconstructions.png")
    (tmp_path / "config.yaml").write_text("model:\n  name: mae_vit_tiny_patch4_32\n")
    assert log_run_pictures(tmp_path, step=3) == ["pictures/reconstructions", "config"]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
