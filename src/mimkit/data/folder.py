"""Any folder of images, scanned recursively; class subfolders optional; bad files skipped, never fatal.

Pretraining uses every image. Labelled work (probes, fine-tuning) uses `labelled_splits`: the folder's own
`train/` and `test/` when both exist, otherwise a seeded, stratified hold-out of the class folders; images
outside class folders are skipped there and counted.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

_MODES = {1: "L", 3: "RGB"}

# Where the folder is given, command by command (pretrain takes config keys, the other commands flags).
PATH_HINT = "`mimkit pretrain ... data.path=DIR`, or --data-path DIR for probe / finetune / visualize"


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


def _scan(root: Path, extensions: tuple[str, ...]) -> list[tuple[str, str]]:
    """Sorted (path, top-level folder name or "" for files directly in root); hidden entries skipped."""
    found: list[tuple[str, str]] = []
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


# Ours, not torchvision's ImageFolder: images at any depth and directly in the root, bad files skipped
# deterministically (and counted across workers), and labels fixed by a given class list.
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
        self,
        root: str | os.PathLike,
        in_chans: int = 3,
        extensions: Iterable[str] = IMG_EXTENSIONS,
        classes: Sequence[str] | None = None,
        draft_size: int | None = None,
    ):
        """classes: fix the class list (and so the label of each folder name), e.g. to give a test folder
        the labels of its train folder; a subfolder not in the list is refused.

        draft_size: decode JPEGs at a reduced scale (1/2, 1/4 or 1/8, done inside the decoder) while both
        sides stay >= draft_size. A 12-megapixel photo then decodes several times faster, which is what a
        CPU run on full-size photos waits for; pixels differ slightly from a full decode, so use it for
        pretraining, not for evaluation that must match other libraries' preprocessing. None: full decode."""
        self.draft_size = draft_size
        self.root = Path(root).expanduser()
        self.mode = mode_for_channels(in_chans)
        self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder {str(self.root)!r} does not exist or is not a directory; "
                f"pass the folder that holds your images ({PATH_HINT})"
            )
        found = _scan(self.root, self.extensions)
        if not found:
            raise FileNotFoundError(
                f"no images found under {str(self.root)!r} (searched recursively for files ending in "
                f"{', '.join(self.extensions)}, case-insensitive; hidden files skipped); "
                f"point the data path at a folder of images ({PATH_HINT})"
            )
        found_classes = sorted({top for _, top in found if top})
        self.classes: list[str] = list(classes) if classes is not None else found_classes
        unknown = sorted(set(found_classes) - set(self.classes))
        if unknown:
            raise ValueError(
                f"{str(self.root)!r} has class folder(s) {unknown} that are not among the classes "
                f"{self.classes}; give both folders the same class subfolders"
            )
        index = {name: i for i, name in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = [(p, index[top] if top else -1) for p, top in found]
        self.num_classes = len(self.classes)
        self._bad = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()  # [N]

    @property
    def num_unlabelled(self) -> int:
        """Images directly in `root` (outside any class folder): label -1."""
        return sum(1 for _, label in self.samples if label < 0)

    def subset(self, indices: Iterable[int]) -> ImageFolder:
        """The same folder restricted to `indices` (in that order); a bad file is replaced by a neighbour
        from the subset, never from outside it (a test image is never swapped for a training image)."""
        view = copy.copy(self)
        view.samples = [self.samples[i] for i in indices]
        view._bad = torch.zeros(len(view.samples), dtype=torch.bool).share_memory_()
        return view

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
            if self.draft_size and img.format == "JPEG":
                img.draft(self.mode, (self.draft_size, self.draft_size))
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


DEFAULT_TEST_FRACTION = 0.2


def stratified_holdout(labels: Sequence[int], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, test indices): per class, round(n * test_fraction) images (at least 1, at most n - 1)
    drawn with a generator seeded by `seed`; negative labels are left out of both. Sorted."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        if label >= 0:
            by_class.setdefault(int(label), []).append(i)
    gen = torch.Generator().manual_seed(seed)
    train: list[int] = []
    test: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        n_test = min(len(members) - 1, max(1, math.floor(len(members) * test_fraction + 0.5)))
        order = torch.randperm(len(members), generator=gen).tolist()
        test += [members[j] for j in order[:n_test]]
        train += [members[j] for j in order[n_test:]]
    return sorted(train), sorted(test)


def _random_subset(folder: ImageFolder, limit: int | None, seed: int) -> ImageFolder:
    if limit is None or limit >= len(folder):
        return folder
    keep = torch.randperm(len(folder), generator=torch.Generator().manual_seed(seed))[:limit]
    return folder.subset(sorted(keep.tolist()))


def labelled_splits(
    root: str | os.PathLike,
    in_chans: int = 3,
    train_split: str = "train",
    test_split: str = "test",
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = 0,
    max_train: int | None = None,
    max_test: int | None = None,
) -> tuple[ImageFolder, ImageFolder, dict[str, Any]]:
    """(train, test, how) for labelled evaluation of a folder; neither split holds an unlabelled image.

    - `root/<train_split>/` and `root/<test_split>/` both exist: they are the splits (the test folder gets
      the train folder's class list, so a class missing from test keeps its label).
    - otherwise: a stratified hold-out of `root`'s class folders, `test_fraction` of each class (at least
      one image) for testing, drawn with `seed`. A class with a single image cannot be split: refused,
      with the fix.

    Images outside class folders (label -1) are skipped and counted in `how["skipped_unlabelled"]`; `how`
    also says which folders or which hold-out (size, fraction, seed) were used. max_*: seeded subsets.
    """
    root = Path(root).expanduser()
    train_dir, test_dir = root / train_split, root / test_split
    if train_split and test_split and train_dir.is_dir() and test_dir.is_dir():
        train = ImageFolder(train_dir, in_chans)
        test = ImageFolder(test_dir, in_chans, classes=train.classes)
        skipped = train.num_unlabelled + test.num_unlabelled
        how: dict[str, Any] = {"kind": "folders", "train": str(train_dir), "test": str(test_dir)}
        train = train.subset(i for i, (_, y) in enumerate(train.samples) if y >= 0)
        test = test.subset(i for i, (_, y) in enumerate(test.samples) if y >= 0)
    else:
        full = ImageFolder(root, in_chans)
        skipped = full.num_unlabelled
        if not full.classes:
            raise ValueError(
                f"{str(root)!r} has no class subfolders, so there are no labels to evaluate with; put the "
                f"images of each class in a subfolder ({root}/<class>/*.jpg), or {root}/{train_split}/<class>/ "
                f"and {root}/{test_split}/<class>/"
            )
        labels = [y for _, y in full.samples]
        counts = {name: labels.count(c) for c, name in enumerate(full.classes)}
        too_few = sorted(name for name, n in counts.items() if n < 2)
        if too_few:
            raise ValueError(
                f"class folder(s) {too_few} of {str(root)!r} hold fewer than 2 images; a held-out test split "
                "needs at least 2 per class (one to train on, one to test). Add images to those folders, "
                f"remove them, or split the data yourself into {root}/{train_split}/<class>/ and "
                f"{root}/{test_split}/<class>/"
            )
        train_idx, test_idx = stratified_holdout(labels, test_fraction, seed)
        train, test = full.subset(train_idx), full.subset(test_idx)
        how = {"kind": "holdout", "test_fraction": test_fraction, "seed": seed, "stratified": True}
    train = _random_subset(train, max_train, seed)
    test = _random_subset(test, max_test, seed + 1)
    how.update(num_train=len(train), num_test=len(test), skipped_unlabelled=skipped)
    if not len(train) or not len(test):
        raise ValueError(
            f"the labelled splits of {str(root)!r} hold {len(train)} training and {len(test)} test images; "
            "both need class subfolders with images"
        )
    return train, test, how


def describe_split(how: dict[str, Any]) -> str:
    """One line for summaries: which images were trained on and which were tested on."""
    if how.get("kind") == "holdout":
        text = (
            f"held-out test split: {how['num_test']} of {how['num_train'] + how['num_test']} labelled images "
            f"({100 * how['test_fraction']:.0f}% of each class, seed {how['seed']}); "
            f"{how['num_train']} to train on"
        )
    elif how.get("kind") == "folders":
        text = f"train: {how['train']} ({how['num_train']} images), test: {how['test']} ({how['num_test']} images)"
    else:
        text = (
            f"train split {how.get('train_split')!r} ({how.get('num_train')} images), test split "
            f"{how.get('test_split')!r} ({how.get('num_test')} images)"
        )
    if how.get("skipped_unlabelled"):
        text += f"; {how['skipped_unlabelled']} image(s) outside class folders skipped"
    return text
