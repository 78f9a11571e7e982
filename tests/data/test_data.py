"""Data pipeline: folders (conversions, bad files), Fashion-MNIST IDX, synthetic data, transforms,
per-sample seeding, and the resumable distributed sampler."""

from __future__ import annotations

import gzip
import io
import random
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.data import (
    FashionMNIST,
    ImageFolder,
    MIMDataset,
    ResumableSampler,
    SyntheticImages,
    build_dataset,
    build_loader,
    default_mean_std,
    eval_transform,
    pretrain_transform,
    read_idx,
)
from mimkit.data import fashion_mnist as fm
from mimkit.masking import MaskGenerator


def _png(path: Path, size=(12, 9), color=(200, 30, 60), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


# ---------------------------------------------------------------- folders


def test_folder_labels_follow_sorted_top_level_subfolders(tmp_path):
    _png(tmp_path / "b" / "x.png")
    _png(tmp_path / "a" / "deep" / "nested" / "y.JPG".lower())  # recursive scan
    _png(tmp_path / "a" / "z.PNG")  # extension match is case-insensitive
    _png(tmp_path / "loose.bmp")  # directly in root: no class
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    _png(tmp_path / "a" / ".hidden.png")  # e.g. macOS resource forks: skipped
    ds = ImageFolder(tmp_path)
    assert ds.classes == ["a", "b"] and ds.num_classes == 2
    labels = {Path(p).name: label for p, label in ds.samples}
    assert labels == {"y.jpg": 0, "z.PNG": 0, "x.png": 1, "loose.bmp": -1}
    img, label = ds[[Path(p).name for p, _ in ds.samples].index("x.png")]
    assert img.mode == "RGB" and img.size == (12, 9) and label == 1


def test_folder_without_subfolders_has_no_labels_and_keeps_any_size(tmp_path):
    for i, size in enumerate([(5, 300), (640, 17), (33, 33)]):
        _png(tmp_path / f"{i}.png", size=size)
    ds = ImageFolder(tmp_path, in_chans=1)
    assert ds.classes == [] and [label for _, label in ds.samples] == [-1, -1, -1]
    assert [ds[i][0].size for i in range(3)] == [(5, 300), (640, 17), (33, 33)]
    assert all(ds[i][0].mode == "L" for i in range(3))


def test_empty_folder_error_says_where_and_which_extensions(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"no images found under .*\.jpg, \.jpeg, \.png"):
        ImageFolder(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "missing")


def test_unsupported_channel_count_is_a_clear_error(tmp_path):
    _png(tmp_path / "a.png")
    with pytest.raises(ValueError, match="in_chans=1 .* or in_chans=3"):
        ImageFolder(tmp_path, in_chans=2)


def _save_modes(root: Path) -> None:
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red -> white background
    rgba.putpixel((1, 0), (0, 0, 255, 255))  # opaque blue stays blue
    rgba.save(root / "rgba.png")
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putpixel((0, 0), (255, 0, 0, 0))  # pure cyan ink -> (0, 255, 255)
    cmyk.putpixel((1, 0), (0, 0, 0, 0))  # no ink -> white
    cmyk.save(root / "cmyk.tif")
    Image.new("L", (2, 1), 77).save(root / "gray.png")
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * (256 * 3 - 6))
    pal.putpixel((0, 0), 1)
    pal.putpixel((1, 0), 0)
    pal.save(root / "palette.gif")
    deep = Image.fromarray(np.array([[65535, 128 * 257]], dtype=np.uint16))  # 16-bit grayscale
    deep.save(root / "deep16.png")


@pytest.mark.parametrize(
    "name, rgb",
    [
        ("rgba.png", [(255, 255, 255), (0, 0, 255)]),
        ("cmyk.tif", [(0, 255, 255), (255, 255, 255)]),
        ("gray.png", [(77, 77, 77), (77, 77, 77)]),
        ("palette.gif", [(10, 20, 30), (0, 0, 0)]),
        ("deep16.png", [(255, 255, 255), (128, 128, 128)]),
    ],
)
def test_folder_converts_every_mode_to_rgb_and_gray(tmp_path, name, rgb):
    _save_modes(tmp_path)
    for in_chans in (3, 1):
        ds = ImageFolder(tmp_path, in_chans=in_chans)
        img, _ = ds[[Path(p).name for p, _ in ds.samples].index(name)]
        assert img.mode == ("RGB" if in_chans == 3 else "L")
        got = [img.getpixel((x, 0)) for x in range(2)]
        if in_chans == 3:
            assert got == rgb
        else:  # ITU-R 601-2 luma of the expected RGB, as PIL defines L
            want = [(r * 299 + g * 587 + b * 114) / 1000 for r, g, b in rgb]
            assert np.allclose(got, want, atol=1)
    assert ds.num_bad == 0


def _bad_folder(root: Path, num_good: int = 6) -> None:
    for i in range(num_good):
        _png(root / f"good_{i}.png", color=(i * 40, 0, 0))
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(random.Random(0).randbytes(500)))
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (root / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "not_an_image.png").write_text("this is a text file with an image extension\n")


def test_bad_file_is_replaced_by_next_loadable_and_warned_once(tmp_path):
    _bad_folder(tmp_path)
    ds = ImageFolder(tmp_path)
    names = [Path(p).name for p, _ in ds.samples]  # sorted: corrupt, good_0.., not_an_image, truncated
    with pytest.warns(RuntimeWarning, match="skipping unreadable image .*corrupt.jpg"):
        img, _ = ds[names.index("corrupt.jpg")]
    assert img.getpixel((0, 0)) == ds[names.index("good_0.png")][0].getpixel((0, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second visit of a known bad file does not warn again
        ds[names.index("corrupt.jpg")]
    with pytest.warns(RuntimeWarning) as record:
        ds[names.index("not_an_image.png")]  # wraps around past truncated.png to good_0
    assert sorted(Path(f).name for f in ds.bad_files) == ["corrupt.jpg", "not_an_image.png", "truncated.png"]
    assert len(record) == 2 and ds.num_bad == 3


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_over_folder_with_bad_files_completes_and_counts(tmp_path, num_workers):
    _bad_folder(tmp_path)
    ds = MIMDataset(ImageFolder(tmp_path), eval_transform(16, 3), MaskGenerator("random", 4, 0.75))
    loader = build_loader(ds, batch_size=3, num_workers=num_workers, drop_last=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        batches = list(loader)
    assert sum(len(b[0]) for b in batches) == len(ds) == 9
    assert batches[0][0].shape == (3, 3, 16, 16) and batches[0][1].shape == (3, 16)
    assert ds.num_bad == 3  # shared memory: the workers' findings reach the main process
    if num_workers == 0:
        assert sum("skipping unreadable" in str(w.message) for w in record) == 3


def test_all_files_bad_is_a_clear_error(tmp_path):
    (tmp_path / "a.png").write_text("nope")
    ds = ImageFolder(tmp_path)
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="none of the 1 files"):
        ds[0]


# ---------------------------------------------------------------- Fashion-MNIST


@pytest.mark.skipif(
    not all((fm.DEBIAN_DIR / (n + ".gz")).exists() for pair in fm.FILES.values() for n in pair),
    reason="Debian Fashion-MNIST files absent (sudo apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_from_debian_package():
    train, test = FashionMNIST(split="train"), FashionMNIST(split="test")
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert np.bincount(train.labels).tolist() == [6000] * 10  # the dataset is class-balanced
    assert np.bincount(test.labels).tolist() == [1000] * 10
    hist = np.bincount(train.images.ravel(), minlength=256)  # pixel statistics without a float copy
    values = np.arange(256) / 255
    mean = (hist * values).sum() / hist.sum()
    std = np.sqrt((hist * (values - mean) ** 2).sum() / hist.sum())
    assert abs(mean - 0.2860) < 1e-3 and abs(std - 0.3530) < 1e-3  # the published train-set statistics
    img, label = train[0]
    assert img.mode == "L" and img.size == (28, 28) and label == 9  # first train item: ankle boot
    assert train.classes[9] == "Ankle boot" and train.num_classes == 10


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_reads_tiny_idx_files(tmp_path, compress):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, (img_name, lbl_name) in fm.FILES.items():
        n = 5 if split == "train" else 3
        arrays[split] = (rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n))
        _write_idx(tmp_path / img_name, arrays[split][0], compress)
        _write_idx(tmp_path / lbl_name, arrays[split][1], compress)
    for split, (images, labels) in arrays.items():
        ds = FashionMNIST(tmp_path, split=split)
        assert len(ds) == len(labels) and ds.root == tmp_path
        for i in range(len(ds)):
            img, label = ds[i]
            assert np.array_equal(np.asarray(img), images[i]) and label == labels[i]


def test_idx_reader_rejects_bad_files(tmp_path):
    _write_idx(tmp_path / "x", np.zeros((4, 3), dtype=np.uint8), compress=False)
    (tmp_path / "short").write_bytes((tmp_path / "x").read_bytes()[:-1])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short")
    (tmp_path / "magic").write_bytes(b"\x01\x02\x08\x01" + bytes(8))
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "magic")
    assert read_idx(tmp_path / "x").shape == (4, 3)


def test_fashion_mnist_missing_files_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*--data-path"):
        FashionMNIST(tmp_path, download=False)


# ---------------------------------------------------------------- synthetic


@pytest.mark.parametrize("in_chans", [1, 3])
def test_synthetic_is_deterministic_and_learnable(in_chans):
    ds = SyntheticImages(400, (16, 24), in_chans, num_classes=10, seed=3)
    img, label = ds[7]
    assert img.mode == ("L" if in_chans == 1 else "RGB") and img.size == (24, 16) and label == 7
    again = SyntheticImages(400, (16, 24), in_chans, seed=3)[7][0]
    assert np.array_equal(np.asarray(img), np.asarray(again))
    assert not np.array_equal(
        np.asarray(img), np.asarray(SyntheticImages(400, (16, 24), in_chans, seed=4)[7][0])
    )
    # Class structure: nearest class centroid on phase-invariant |FFT| features is far above chance (10%).
    feats = np.stack(
        [np.abs(np.fft.fft2(np.asarray(ds[i][0], np.float32), axes=(0, 1))).ravel() for i in range(400)]
    )
    labels = np.arange(400) % 10
    centroids = np.stack([feats[:300][labels[:300] == k].mean(0) for k in range(10)])
    pred = ((feats[300:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == labels[300:]).mean() > 0.8


# ---------------------------------------------------------------- transforms


@pytest.mark.parametrize("size", [16, (12, 20)])
@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("src_mode", ["L", "RGB", "RGBA"])
def test_transforms_output_shape_for_any_source(size, in_chans, src_mode):
    h, w = (size, size) if isinstance(size, int) else size
    img = Image.new(src_mode, (50, 37), (90,) * len(src_mode))
    mean, std = default_mean_std("folder", in_chans)
    for make in (pretrain_transform, eval_transform):
        x = make(size, in_chans, mean, std)(img)
        assert type(x) is torch.Tensor and x.dtype == torch.float32 and x.shape == (in_chans, h, w)


def test_eval_transform_normalizes_and_center_crops():
    arr = np.zeros((20, 80), dtype=np.uint8)
    arr[:, 20:60] = 200  # the center is bright, the sides dark
    # crop_pct is 1 for gray: 20x80 -> 10x40 -> center 10x10, which lies inside the bright part
    x = eval_transform(10, 1, (0.25,), (0.5,))(Image.fromarray(arr))
    assert x.shape == (1, 10, 10)
    assert torch.allclose(x, torch.full_like(x, (200 / 255 - 0.25) / 0.5), atol=1e-5)
    photo = eval_transform(224, 3).transforms[1]  # RGB photos: resize to 256 then crop 224, as timm does
    assert photo.size == (256, 256)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_fused_to_tensor_matches_torchvision_to_tensor_normalize(mode):
    from torchvision import transforms as T

    from mimkit.data.transforms import ToNormalizedTensor

    c = 1 if mode == "L" else 3
    arr = np.random.default_rng(0).integers(0, 256, (7, 5, c), dtype=np.uint8).squeeze()
    img = Image.fromarray(arr)
    mean, std = [0.1, 0.5, 0.9][:c], [0.2, 0.3, 0.4][:c]
    ref = T.Normalize(mean, std)(T.ToTensor()(img))
    assert torch.allclose(ToNormalizedTensor(mean, std)(img), ref, atol=1e-6)


def test_default_mean_std():
    assert default_mean_std("fashion_mnist", 1) == ((0.2860,), (0.3530,))
    assert default_mean_std("fashion_mnist", 3) == ((0.2860,) * 3, (0.3530,) * 3)
    assert default_mean_std("folder", 3) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert default_mean_std("synthetic", 1) == ((0.5,), (0.5,))


# ---------------------------------------------------------------- per-sample seeding


def _mim(seed=0, kind="random"):
    base = SyntheticImages(32, 24, 3, seed=0)
    return MIMDataset(base, pretrain_transform(16, 3), MaskGenerator(kind, 4, 0.5), seed=seed)


@pytest.mark.parametrize("kind", ["random", "block"])
def test_sample_is_a_pure_function_of_seed_epoch_index(kind):
    ds = _mim(kind=kind)
    ds.set_epoch(3)
    img, mask, label = ds[5]
    torch.rand(100)  # disturbing the global RNGs changes nothing
    random.random()
    other = _mim(kind=kind)
    other.set_epoch(3)
    img2, mask2, label2 = other[5]
    assert torch.equal(img, img2) and torch.equal(mask, mask2) and label == label2 == 5
    assert mask.dtype == torch.bool and mask.shape == (16,) and int(mask.sum()) == 8
    ds.set_epoch(4)
    img4, mask4, _ = ds[5]
    assert not torch.equal(img, img4) and not torch.equal(mask, mask4)
    assert not torch.equal(_mim(seed=1, kind=kind)[5][0], _mim(seed=0, kind=kind)[5][0])


def test_getitem_leaves_global_rngs_untouched():
    ds = _mim()
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    for i in range(4):
        ds[i]
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state


def test_no_mask_generator_gives_empty_mask():
    ds = MIMDataset(SyntheticImages(4, 8, 1), eval_transform(8, 1))
    img, mask, label = ds[1]
    assert img.shape == (1, 8, 8) and mask.dtype == torch.bool and mask.shape == (0,) and label == 1


def test_batches_do_not_depend_on_worker_count():
    ds = _mim()
    ds.set_epoch(2)
    sampler = ResumableSampler(len(ds), seed=1)
    sampler.set_epoch(2)
    runs = [list(build_loader(ds, 4, num_workers=w, sampler=sampler)) for w in (0, 2)]
    for (a_img, a_mask, a_lbl), (b_img, b_mask, b_lbl) in zip(*runs):
        assert torch.equal(a_img, b_img) and torch.equal(a_mask, b_mask) and torch.equal(a_lbl, b_lbl)
    assert len(runs[0]) == 8


# ---------------------------------------------------------------- sampler


@pytest.mark.parametrize(
    "n, world, shuffle, drop_last", [(103, 2, True, True), (103, 3, True, False), (10, 4, False, False)]
)
def test_sampler_matches_torch_distributed_sampler(n, world, shuffle, drop_last):
    data = list(range(n))
    for rank in range(world):
        ours = ResumableSampler(n, world, rank, seed=7, shuffle=shuffle, drop_last=drop_last)
        ref = torch.utils.data.DistributedSampler(
            data, world, rank, shuffle=shuffle, seed=7, drop_last=drop_last
        )
        for epoch in (0, 5):
            ours.set_epoch(epoch)
            ref.set_epoch(epoch)
            assert list(ours) == list(ref) and len(ours) == len(ref)


@pytest.mark.parametrize("b", [1, 4, 8])
def test_two_ranks_see_the_same_samples_per_step_as_one_rank_with_accumulation(b):
    n = 37
    single = ResumableSampler(n, 1, 0, seed=3)
    ranks = [ResumableSampler(n, 2, r, seed=3) for r in range(2)]
    for s in (single, *ranks):
        s.set_epoch(1)
    one = list(single)
    shares = [list(r) for r in ranks]
    for step in range(n // (2 * b)):
        both = shares[0][step * b : (step + 1) * b] + shares[1][step * b : (step + 1) * b]
        assert sorted(both) == sorted(one[step * 2 * b : (step + 1) * 2 * b])


def test_sampler_ranks_are_disjoint_cover_everything_and_change_per_epoch():
    n, world = 50, 3
    shares = [list(ResumableSampler(n, world, r, seed=0)) for r in range(world)]
    flat = [i for s in shares for i in s]
    assert len(flat) == len(set(flat)) == n - n % world and all(len(s) == n // world for s in shares)
    whole = ResumableSampler(n, 1, 0, seed=0)
    assert sorted(whole) == list(range(n))
    first = list(whole)
    whole.set_epoch(1)
    assert list(whole) != first and sorted(whole) == list(range(n))


def test_set_start_skips_this_epoch_only():
    s = ResumableSampler(40, 2, 1, seed=5)
    s.set_epoch(2)
    full = list(s)
    s.set_start(7)
    assert list(s) == full[7:] and len(s) == 13
    s.set_epoch(2)
    assert list(s) == full and len(s) == 20
    with pytest.raises(ValueError, match="start must be in"):
        s.set_start(21)


# ---------------------------------------------------------------- build_dataset / build_loader


def test_build_dataset_sources_and_errors(tmp_path):
    with pytest.raises(ValueError, match="valid sources: folder, fashion_mnist, synthetic, cifar10"):
        build_dataset("imagenet")
    with pytest.raises(ValueError, match="needs a path"):
        build_dataset("folder")
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            for i in range(3):
                _png(tmp_path / split / c / f"{i}.png")
    val = build_dataset("folder", tmp_path, split="val", in_chans=1)
    assert len(val) == 6 and val.classes == ["cat", "dog"] and val[0][0].mode == "L"
    assert all("/val/" in p for p, _ in val.samples)
    sub = build_dataset("folder", tmp_path / "train", num_samples=4, seed=1)  # no train/train: path itself
    assert len(sub) == 4 and sub.classes == ["cat", "dog"] and sub.num_bad == 0
    syn = build_dataset("synthetic", num_samples=12, img_size=(8, 10), in_chans=1)
    assert len(syn) == 12 and syn[0][0].size == (10, 8) and syn.num_classes == 10


def test_build_loader_settings_and_batch_layout():
    ds = _mim()
    loader = build_loader(ds, batch_size=8, num_workers=0)
    assert loader.pin_memory == torch.cuda.is_available() and not loader.persistent_workers
    images, masks, labels = next(iter(loader))
    assert images.shape == (8, 3, 16, 16) and masks.shape == (8, 16) and labels.dtype == torch.int64
    assert labels.tolist() == list(range(8))  # sequential when no sampler
