"""One data path for every method.

Every base dataset (ImageFolder, FashionMNIST, SyntheticImages, torchvision's CIFAR10) returns
`(PIL.Image, int label)` (label -1 when unknown) and carries `classes` / `num_classes` where known.
MIMDataset adds the transform and the mask, seeded per sample; ResumableSampler splits epochs over processes
and resumes mid-epoch; build_loader makes the DataLoader; build_pretrain_data does all of it from the
config's `data` section (the trainer's data path).

    base = build_dataset("fashion_mnist", img_size=28, in_chans=1)
    mean, std = default_mean_std("fashion_mnist", 1)
    ds = MIMDataset(base, pretrain_transform(28, 1, mean, std), model.mask_generator, seed=0)
    sampler = ResumableSampler(len(ds), num_replicas=world, rank=rank, seed=0)
    loader = build_loader(ds, batch_size=64, num_workers=4, sampler=sampler)
    for epoch in ...: sampler.set_epoch(epoch); ds.set_epoch(epoch); for images, masks, labels in loader: ...
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from .fashion_mnist import FashionMNIST, read_idx
from .folder import IMG_EXTENSIONS, ImageFolder, mode_for_channels, to_mode
from .mim_dataset import MIMDataset, mix_seed
from .pretrain import build_pretrain_data, micro_batches
from .sampler import ResumableSampler
from .synthetic import SyntheticImages
from .transforms import default_mean_std, eval_transform, pretrain_transform

SOURCES = ("folder", "fashion_mnist", "synthetic", "cifar10")

__all__ = [
    "IMG_EXTENSIONS",
    "SOURCES",
    "FashionMNIST",
    "ImageFolder",
    "MIMDataset",
    "CappedImageFolder",
    "ImageTooLarge",
    "ResumableSampler",
    "SubsetDataset",
    "SyntheticImages",
    "build_dataset",
    "build_pretrain_data",
    "build_loader",
    "default_mean_std",
    "eval_transform",
    "micro_batches",
    "mix_seed",
    "mode_for_channels",
    "pretrain_transform",
    "read_idx",
    "to_mode",
]


class SubsetDataset(torch.utils.data.Dataset):
    """A fixed selection of a base dataset's items, keeping its `classes`, `num_classes` and `num_bad`."""

    def __init__(self, base: torch.utils.data.Dataset, indices: list[int]):
        self.base = base
        self.indices = list(indices)
        self.classes = getattr(base, "classes", None)
        self.num_classes = getattr(base, "num_classes", None)

    @property
    def num_bad(self) -> int:
        return getattr(self.base, "num_bad", 0)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.base[self.indices[index]]

    def __repr__(self) -> str:
        return f"SubsetDataset({self.base!r}, samples={len(self)})"


def build_dataset(
    source: str,
    path: str | os.PathLike | None = None,
    split: str = "train",
    num_samples: int | None = None,
    img_size: int | tuple[int, int] = 224,
    in_chans: int = 3,
    seed: int = 0,
    max_image_pixels: int | None = None,
) -> Any:
    """A base dataset of (PIL image, int label) from `source`:

    - "folder": every image under `path` (or under `path/split` when that folder exists), recursively;
    - "fashion_mnist": `path` if given, else the Debian package's files, else a torchvision download;
    - "synthetic": `num_samples` (default 1024) generated images of img_size and in_chans;
    - "cifar10": torchvision's CIFAR-10, downloaded into `path` (default ~/.cache/mimkit/cifar10).

    num_samples (not synthetic): keep a random subset of that many items (seeded by `seed`, kept in order).
    img_size / in_chans matter for "synthetic" and set the folder's color mode; the transforms convert
    any source to the model's size and channel count.
    max_image_pixels ("folder"): skip larger images with a warning, reading only their header (None: no cap
    beyond Pillow's own).
    """
    dataset: Any
    if source == "folder":
        if path is None:
            raise ValueError(
                "source 'folder' needs a path: data.path=/path/to/images for pretrain, --data-path for the "
                "other commands"
            )
        root = Path(path).expanduser()
        if split and (root / split).is_dir():
            root = root / split
        if max_image_pixels is None:
            dataset = ImageFolder(root, in_chans=in_chans)
        else:
            dataset = CappedImageFolder(root, in_chans=in_chans, max_pixels=max_image_pixels)
    elif source == "fashion_mnist":
        dataset = FashionMNIST(path, split=split)
    elif source == "synthetic":
        return SyntheticImages(
            num_samples or 1024, img_size, in_chans, seed=seed if split == "train" else mix_seed(seed, 1)
        )
    elif source == "cifar10":
        import torchvision

        root = Path(path).expanduser() if path is not None else Path("~/.cache/mimkit/cifar10").expanduser()
        try:
            dataset = torchvision.datasets.CIFAR10(str(root), train=split == "train", download=True)
        except Exception as err:
            raise DataError(
                f"could not load or download CIFAR-10 into {str(root)!r} ({type(err).__name__}: {err}); "
                "go online once, or use data.source=folder with your own images"
            ) from err
        dataset.num_classes = len(dataset.classes)
    else:
        raise ValueError(f"unknown data source {source!r}; valid sources: {', '.join(SOURCES)}")
    if num_samples is not None and num_samples < len(dataset):
        gen = torch.Generator().manual_seed(seed)
        indices = np.sort(torch.randperm(len(dataset), generator=gen)[:num_samples].numpy()).tolist()
        dataset = SubsetDataset(dataset, indices)
    return dataset


class ImageTooLarge(ValueError):
    """An image with more pixels than allowed (`data.max_image_pixels`): skipped like an unreadable file."""


class CappedImageFolder(ImageFolder):
    """An ImageFolder that treats images over `max_pixels` as unreadable: skipped with a warning, once (the
    folder remembers bad files), after reading only the file header, never decoding the pixels."""

    def __init__(self, root: str | os.PathLike, in_chans: int = 3, max_pixels: int = 89_478_485, **kwargs):
        super().__init__(root, in_chans, **kwargs)
        self.max_pixels = max_pixels

    def load(self, index: int) -> Image.Image:
        with Image.open(self.samples[index][0]) as img:  # lazy: the header only
            width, height = img.size
        if width * height > self.max_pixels:
            raise ImageTooLarge(
                f"{width}x{height} = {width * height:,} pixels, over data.max_image_pixels={self.max_pixels:,}"
            )
        return super().load(index)


def _worker_init(worker_id: int) -> None:
    # Workers each get one intra-op thread: N workers x all cores would oversubscribe the CPU.
    torch.set_num_threads(1)
    # A Ctrl-C or a SIGTERM sent to the whole process group is the main process's to handle: it finishes
    # the step, checkpoints and then shuts the workers down (they must live until then).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when the main process dies, even by SIGKILL (no orphans)."""
    if sys.platform != "linux":
        return
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def build_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    num_workers: int = 0,
    sampler: torch.utils.data.Sampler | None = None,
    drop_last: bool = True,
    pin_memory: bool | None = None,
    prefetch_factor: int | None = None,
    collate_fn=None,
) -> torch.utils.data.DataLoader:
    """A DataLoader over `dataset` in `sampler` order (sequential when None).

    Workers are not persistent, so `set_epoch` on the dataset and sampler reaches them each epoch; each
    worker uses one torch thread. pin_memory defaults to True only when CUDA is available.
    """
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    extra: dict[str, Any] = (
        {"prefetch_factor": prefetch_factor} if num_workers > 0 and prefetch_factor is not None else {}
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=False,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        collate_fn=collate_fn,
        **extra,
    )
