"""Fashion-MNIST from its four IDX files: a given folder, the Debian package, or a torchvision download."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

DEBIAN_DIR = Path(
    "/usr/share/datasets/fashion-mnist"
)  # where `apt-get install dataset-fashion-mnist` puts them

CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_IDX_DTYPES: dict[int, Any] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (plain or .gz): 2 zero bytes, a dtype code, ndim, ndim big-endian uint32 sizes, data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{str(path)!r} is not an IDX file (bad magic number {data[:4].hex()})")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{str(path)!r} is truncated or corrupt: header says shape {shape} ({expected} bytes), "
            f"file holds {len(data) - header} bytes; delete it and fetch it again"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(directory: Path, name: str) -> Path | None:
    for candidate in (name, name + ".gz"):
        for sub in (directory, directory / "FashionMNIST" / "raw", directory / "raw"):
            if (sub / candidate).is_file():
                return sub / candidate
    return None


def _find_split(directory: Path, split: str) -> tuple[Path, Path] | None:
    images, labels = (_find(directory, name) for name in FILES[split])
    return (images, labels) if images is not None and labels is not None else None


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mimkit" / "fashion-mnist"


def locate(root: str | os.PathLike | None, split: str, download: bool = True) -> tuple[Path, Path]:
    """Paths of (images, labels) for `split`: `root`, else the Debian package's folder, else a download."""
    searched = [Path(root).expanduser()] if root is not None else []
    searched.append(DEBIAN_DIR)
    for directory in searched:
        found = _find_split(directory, split)
        if found is not None:
            return found
    target = searched[0] if root is not None else default_cache_dir()
    problem = "downloading is disabled"
    if download:
        try:
            import torchvision

            target.mkdir(parents=True, exist_ok=True)
            torchvision.datasets.FashionMNIST(str(target), train=split == "train", download=True)
            found = _find_split(target, split)
            if found is not None:
                return found
            problem = f"torchvision's download left no IDX files in {str(target)!r}"
        except Exception as err:  # offline, proxy, permissions, ...
            problem = f"download through torchvision failed ({type(err).__name__}: {err})"
    raise FileNotFoundError(
        f"Fashion-MNIST {split} files ({' and '.join(FILES[split])}, plain or .gz) not found in "
        f"{', '.join(repr(str(d)) for d in searched)}, and {problem}. Install them with "
        "`sudo apt-get install dataset-fashion-mnist`, or pass --data-path to a folder holding the four IDX files"
    )


class FashionMNIST(torch.utils.data.Dataset):
    """Fashion-MNIST, item i -> (PIL "L" image 28x28, int label in 0..9); the uint8 arrays stay in memory.

    `root`: a folder with the IDX files (also accepted: torchvision's `root/FashionMNIST/raw` layout).
    Without it, the Debian package's folder (/usr/share/datasets/fashion-mnist) is used, else the files are
    downloaded through torchvision into the user cache (~/.cache/mimkit/fashion-mnist).
    """

    classes = CLASSES
    num_classes = len(CLASSES)

    def __init__(self, root: str | os.PathLike | None = None, split: str = "train", download: bool = True):
        if split not in FILES:
            raise ValueError(f"Fashion-MNIST split must be one of {sorted(FILES)}, got {split!r}")
        self.split = split
        image_path, label_path = locate(root, split, download)
        self.images = read_idx(image_path)  # [N, 28, 28] uint8
        self.labels = read_idx(label_path).astype(np.int64)  # [N]
        if self.images.ndim != 3 or self.labels.ndim != 1 or len(self.images) != len(self.labels):
            raise ValueError(
                f"{str(image_path)!r} / {str(label_path)!r} do not look like Fashion-MNIST: image array "
                f"{self.images.shape}, label array {self.labels.shape}"
            )
        self.root = image_path.parent

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), int(self.labels[index])  # uint8 [28, 28] -> mode "L"

    def __repr__(self) -> str:
        return f"FashionMNIST(split={self.split!r}, samples={len(self)}, root={str(self.root)!r})"
