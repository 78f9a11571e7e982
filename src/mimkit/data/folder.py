"""Any folder of images, scanned recursively; class subfolders optional; bad files skipped, never fatal."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

_MODES = {1: "L", 3: "RGB"}


def mode_for_channels(in_chans: int) -> str:
    """PIL mode for a channel count: 1 -> "L", 3 -> "RGB"."""
    if in_chans not in _MODES:
        raise ValueError(
            f"images can be read with in_chans=1 (grayscale) or in_chans=3 (RGB), got in_chans={in_chans}; "
            "set the model's in_chans to 1 or 3 for image folders"
        )
    return _MODES[in_chans]


def to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert any PIL image (L, LA, P, RGBA, CMYK, I;16, I, F, ...) to "L" or "RGB".

    Transparent pixels are composited onto white (so a logo with an alpha channel looks like the logo);
    16/32-bit and float grayscale are rescaled to 8 bits rather than clipped.
    """
    if img.mode == mode:
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba).convert("RGB")
    elif img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img).astype(np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max(initial=0.0)), 255.0)
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return img.convert(mode)


def _scan(root: Path, extensions: tuple[str, ...]) -> list[tuple[str, int | str]]:
    """Sorted (path, top-level folder name or "" for files directly in root); hidden entries skipped."""
    found: list[tuple[str, int | str]] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink cycle
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        top = rel.parts[0] if rel.parts else ""
        for name in sorted(filenames):
            if not name.startswith(".") and name.lower().endswith(extensions):
                found.append((os.path.join(dirpath, name), top))
    found.sort(key=lambda item: item[0])
    return found


class ImageFolder(torch.utils.data.Dataset):
    """Every image under `root` (recursively); item i -> (PIL image in mode "L" or "RGB", int label).

    Labels: when images sit in subfolders, the label is the index of the top-level subfolder in sorted
    order (`classes` lists their names); images directly in `root` get -1, and so does everything when
    there are no subfolders (`classes == []`). Images of any size are returned as they are.

    A file that cannot be decoded (corrupt, truncated, not really an image) never stops a run: it is
    reported once with a warning, counted in `num_bad`, and the next index that loads is returned instead
    (deterministic, so per-sample seeding stays exact). The bad-file record lives in shared memory, so
    `num_bad` in the main process also counts what data-loader workers found.
    """

    def __init__(
        self, root: str | os.PathLike, in_chans: int = 3, extensions: Iterable[str] = IMG_EXTENSIONS
    ):
        self.root = Path(root).expanduser()
        self.mode = mode_for_channels(in_chans)
        self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder {str(self.root)!r} does not exist or is not a directory; "
                "pass the folder that holds your images (e.g. --data-path /path/to/images)"
            )
        found = _scan(self.root, self.extensions)
        if not found:
            raise FileNotFoundError(
                f"no images found under {str(self.root)!r} (searched recursively for files ending in "
                f"{', '.join(self.extensions)}, case-insensitive; hidden files skipped); "
                "point --data-path at a folder of images"
            )
        self.classes: list[str] = sorted({top for _, top in found if top})
        index = {name: i for i, name in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = [(p, index[top] if top else -1) for p, top in found]
        self.num_classes = len(self.classes)
        self._bad = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()  # [N]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_bad(self) -> int:
        """Files found unreadable so far (by this process and its data-loader workers)."""
        return int(self._bad.sum())

    @property
    def bad_files(self) -> list[str]:
        return [self.samples[i][0] for i in self._bad.nonzero().flatten().tolist()]

    def load(self, index: int) -> Image.Image:
        """Decode one file fully (raises on a corrupt or truncated file)."""
        with Image.open(self.samples[index][0]) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_mode(img, self.mode)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        n = len(self.samples)
        for offset in range(n):
            i = (index + offset) % n
            if self._bad[i]:
                continue
            try:
                img = self.load(i)
            except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
                self._bad[i] = True
                warnings.warn(
                    f"skipping unreadable image {self.samples[i][0]!r} ({type(err).__name__}: {err}); "
                    "a neighbouring image is used instead",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            return img, self.samples[i][1]
        raise RuntimeError(f"none of the {n} files under {str(self.root)!r} could be read as an image")

    def __repr__(self) -> str:
        return (
            f"ImageFolder({str(self.root)!r}, mode={self.mode}, samples={len(self)}, "
            f"classes={self.num_classes}, bad={self.num_bad})"
        )
