"""WebDataset-compatible tar shards: write them from a folder, stream them with exact splitting and resume.

Shard layout (what `webdataset` and `mimkit shards` both use): plain POSIX tar files; each sample is a group
of members sharing a key, `{key}.jpg` (or .png, .webp, ...: the original bytes) and `{key}.cls` (the
integer label as text, absent when unlabelled). `mimkit shards` also writes `index.json` beside the shards
(sample count per shard, class names), so readers know sizes without scanning; without it the tar headers
are scanned once (cheap: members are skipped by seeking).

Epoch order and splitting (`ShardDataset`):

1. The epoch's global sequence: shards in a permutation seeded by (seed, epoch), and inside each shard its
   samples in a permutation seeded by (seed, epoch, shard) (identity order with shuffle=False).
2. Ranks: rank r takes the contiguous positions [r*q, (r+1)*q) of that sequence, q = total // world_size
   (like drop_last: fewer than world_size samples per epoch are left out). Every rank gets exactly the
   same count, which DDP needs, and reads only ~1/world of the shards (whole shards when the counts divide
   evenly; a boundary shard is read in part by two ranks). This is a sample-level split of the epoch
   sequence, so it works with any number of shards, including fewer shards than ranks x workers.
3. Workers: within a rank, batch j of the rank's remaining stream goes to worker j % num_workers, so the
   DataLoader (which takes batches from workers round-robin) returns the rank's stream in order, whatever
   the worker count. Workers skip the other workers' members by seeking, without decoding them.
4. Resume: `set_start(n)` skips the first n samples of this rank's share for the current epoch (the
   trainer passes batches_done * batch_size); the stream continues exactly where it stopped.

Per-sample augmentation and masks are seeded from (seed, epoch, sample id) as in `MIMDataset`, where the
sample id is the sample's position in the unshuffled shard list, so they do not depend on splitting.
Shards must be local (seekable) files.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from braceexpand import braceexpand

from .mim_dataset import MIMDataset, mix_seed

INDEX_NAME = "index.json"
INDEX_FORMAT = "mimkit-shards/1"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")


def expand_braces(pattern: str) -> list[str]:
    """`train-{0000..0099}.tar` -> 100 names (zero padding kept); `{a,b}` -> both; several braces combine
    (the `braceexpand` package, as webdataset expands its URLs)."""
    return list(braceexpand(pattern))


def resolve_shards(urls: str | os.PathLike | Iterable[str]) -> list[Path]:
    """Shard paths from a brace pattern, a directory (its *.tar, sorted), or a list of either."""
    if isinstance(urls, (str, os.PathLike)):
        urls = [str(urls)]
    paths: list[Path] = []
    for url in urls:
        if Path(url).is_dir():
            paths += sorted(Path(url).glob("*.tar"))
        else:
            paths += [Path(p) for p in expand_braces(str(url))]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} shard(s) not found, e.g. {missing[0]}; check the pattern "
            "(e.g. 'shards/train-{0000..0099}.tar') or write shards with `mimkit shards`"
        )
    if not paths:
        raise FileNotFoundError(f"no shards match {urls}")
    return paths


# ---------------------------------------------------------------------------------------------------------
# Writing


def write_shards(
    samples: Iterable[tuple[bytes, str, int]],
    out_dir: str | os.PathLike,
    shard_size: int,
    prefix: str = "train",
    classes: list[str] | None = None,
) -> dict[str, Any]:
    """Write (image bytes, extension, label) samples into `{prefix}-{i:04d}.tar` of `shard_size` samples each
    (`webdataset.ShardWriter`).

    Keys are the zero-padded global sample index; label < 0 writes no `.cls`. Each shard is written to a
    hidden temporary name and renamed when complete; members carry mtime 0, so the same input gives the same
    bytes. Returns the index also written to `out_dir/index.json`.
    """
    import webdataset

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts: list[int] = []

    def publish(tmp: str) -> None:  # ShardWriter calls this with each finished shard
        os.replace(tmp, out / Path(tmp).name.removeprefix(".").removesuffix(".tmp"))

    pattern = str(out / f".{prefix}-%04d.tar.tmp")
    with webdataset.ShardWriter(
        pattern, maxcount=shard_size, post=publish, verbose=0, mtime=0, encoder=False, maxsize=float("inf")
    ) as sink:
        for index, (data, ext, label) in enumerate(samples):
            sample = {"__key__": f"{index:08d}", ext.lower().lstrip("."): data}
            if label is not None and label >= 0:
                sample["cls"] = str(int(label)).encode()
            sink.write(sample)
            if index % shard_size == 0:
                counts.append(0)
            counts[-1] += 1
    summary = {
        "format": INDEX_FORMAT,
        "num_samples": sum(counts),
        "shards": [{"name": f"{prefix}-{i:04d}.tar", "samples": n} for i, n in enumerate(counts)],
        "classes": list(classes or []),
    }
    (out / INDEX_NAME).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def folder_to_shards(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    shard_size: int,
    prefix: str = "train",
    verify: bool = True,
) -> dict[str, Any]:
    """Shards from an image folder (recursive; top-level subfolders are classes, as `ImageFolder`).

    The original file bytes are stored. With `verify`, files that do not decode are skipped with a warning
    (their count is in the index as "skipped").
    """
    from PIL import Image

    from .folder import ImageFolder

    folder = ImageFolder(src)
    skipped: list[str] = []

    def items() -> Iterator[tuple[bytes, str, int]]:
        for path, label in folder.samples:
            data = Path(path).read_bytes()
            if verify:
                try:
                    with Image.open(io.BytesIO(data)) as img:
                        img.load()
                except Exception as err:  # PIL raises many types for bad files
                    skipped.append(path)
                    warnings.warn(f"skipping unreadable image {path!r} ({type(err).__name__})", stacklevel=2)
                    continue
            yield data, Path(path).suffix.lstrip(".").lower(), label

    index = write_shards(items(), out_dir, shard_size, prefix, folder.classes)
    index["skipped"] = len(skipped)
    (Path(out_dir) / INDEX_NAME).write_text(json.dumps(index, indent=1) + "\n")
    return index


# ---------------------------------------------------------------------------------------------------------
# Reading (ours, not webdataset.WebDataset: a sample-level split that gives every rank the same count with any
# number of shards, worker-count-independent order, and exact mid-epoch resume; webdataset splits by shard)


def list_samples(path: str | os.PathLike) -> list[tuple[str, dict[str, tarfile.TarInfo]]]:
    """[(key, {extension: TarInfo})] of one shard, sorted by key (headers only; data is skipped)."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            base = info.name.rsplit("/", 1)[-1]
            if "." not in base:
                continue
            key, ext = base.split(".", 1)
            prefix = info.name[: len(info.name) - len(base)]
            groups.setdefault(prefix + key, {})[ext.lower()] = info
    return sorted((k, v) for k, v in groups.items() if any(e in v for e in IMAGE_EXTS))


def shard_sizes(paths: list[Path]) -> tuple[list[int], list[str]]:
    """(samples per shard, class names) from each folder's index.json, scanning shards it does not list."""
    indexes: dict[Path, dict[str, int]] = {}
    classes: list[str] = []
    sizes = []
    for p in paths:
        folder = p.parent
        if folder not in indexes:
            indexes[folder] = {}
            if (folder / INDEX_NAME).is_file():
                meta = json.loads((folder / INDEX_NAME).read_text())
                indexes[folder] = {s["name"]: int(s["samples"]) for s in meta.get("shards", [])}
                classes = classes or list(meta.get("classes", []))
        n = indexes[folder].get(p.name)
        sizes.append(n if n is not None else len(list_samples(p)))
    return sizes, classes


def _member_bytes(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    member = tar.extractfile(info)
    if member is None:  # list_samples keeps regular files only
        raise ValueError(f"{info.name} in {tar.name!r} is not a regular file")
    return member.read()


class _Current(torch.utils.data.Dataset):
    """Hands MIMDataset the sample being streamed, so shards reuse its exact per-sample seeding."""

    item: Any = None

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> Any:
        return self.item


class ShardDataset(torch.utils.data.IterableDataset):
    """Stream (PIL image, label) — or (image [C, H, W], mask [L], label) with a transform — from tar shards.

    rank / world_size default to torch.distributed's when initialised. `batch_size` must equal the
    DataLoader's, so the loader returns this rank's samples in stream order (see the module doc).
    Call `set_epoch(e)` before each epoch and `set_start(n)` to resume after n samples of this rank.
    """

    def __init__(
        self,
        urls: str | os.PathLike | Iterable[str],
        batch_size: int = 1,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        in_chans: int | None = 3,
        transform: Callable | None = None,
        mask_generator: Callable[..., torch.Tensor] | None = None,
        max_image_pixels: int | None = None,
    ):
        """max_image_pixels: a larger image is skipped like a corrupt one, after reading only its header."""
        if rank is None or world_size is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            rank = rank if rank is not None else (dist.get_rank() if ready else 0)
            world_size = world_size if world_size is not None else (dist.get_world_size() if ready else 1)
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.paths = resolve_shards(urls)
        self.max_image_pixels = max_image_pixels
        self.sizes, self.classes = shard_sizes(self.paths)
        self.num_classes = len(self.classes)
        self.offsets = [
            sum(self.sizes[:i]) for i in range(len(self.sizes))
        ]  # sample id of each shard's first
        self.total = sum(self.sizes)
        if self.total < world_size:
            raise ValueError(f"{self.total} samples cannot be split over {world_size} processes")
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.in_chans = in_chans
        self.epoch = 0
        self.start = 0
        self.num_bad = 0
        self._current = _Current()
        self._mim = (
            MIMDataset(self._current, transform, mask_generator, seed) if transform is not None else None
        )

    # -- position bookkeeping -----------------------------------------------------------------------
    @property
    def per_rank(self) -> int:
        return self.total // self.world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start = 0
        if self._mim is not None:
            self._mim.set_epoch(epoch)

    def set_start(self, start: int) -> None:
        """Skip this rank's first `start` samples of the current epoch (resume after `start` samples)."""
        if not 0 <= start <= self.per_rank:
            raise ValueError(f"start must be in [0, {self.per_rank}] for this rank's share, got {start}")
        self.start = start

    def __len__(self) -> int:
        return self.per_rank - self.start

    def epoch_plan(self) -> list[tuple[int, int]]:
        """This rank's (shard index, member index) sequence for the current epoch, ignoring set_start."""
        if self.shuffle:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(len(self.paths), generator=gen).tolist()
        else:
            order = list(range(len(self.paths)))
        lo, hi = self.rank * self.per_rank, (self.rank + 1) * self.per_rank
        plan: list[tuple[int, int]] = []
        pos = 0
        for s in order:
            n = self.sizes[s]
            if pos + n > lo and pos < hi:
                if self.shuffle:
                    gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, s))
                    members = torch.randperm(n, generator=gen).tolist()
                else:
                    members = list(range(n))
                a, b = max(lo - pos, 0), min(hi - pos, n)
                plan += [(s, m) for m in members[a:b]]
            pos += n
            if pos >= hi:
                break
        return plan

    def worker_plan(self, worker_id: int = 0, num_workers: int = 1) -> list[tuple[int, int]]:
        """The part of this rank's remaining stream that one data-loader worker yields (whole batches)."""
        plan = self.epoch_plan()[self.start :]
        bs = self.batch_size
        return [item for j, item in enumerate(plan) if (j // bs) % num_workers == worker_id]

    # -- decoding ---------------------------------------------------------------------------------------
    def _decode(self, data: bytes):
        from PIL import Image, ImageOps

        from .folder import mode_for_channels, to_mode

        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if self.max_image_pixels is not None and width * height > self.max_image_pixels:
                raise ValueError(
                    f"{width}x{height} = {width * height:,} pixels, over data.max_image_pixels="
                    f"{self.max_image_pixels:,}"
                )
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_mode(img, mode_for_channels(self.in_chans)) if self.in_chans else img.copy()

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        listings: dict[int, list] = {}
        tars: dict[int, tarfile.TarFile] = {}
        last_good = None
        try:
            for shard, member in self.worker_plan(worker_id, num_workers):
                if shard not in tars:
                    for t in tars.values():
                        t.close()
                    tars = {shard: tarfile.open(self.paths[shard], "r:")}
                    listings = {shard: list_samples(self.paths[shard])}
                key, files = listings[shard][member]
                ext = next(e for e in IMAGE_EXTS if e in files)
                try:
                    img = self._decode(_member_bytes(tars[shard], files[ext]))
                    label = int(_member_bytes(tars[shard], files["cls"])) if "cls" in files else -1
                    last_good = (img, label)
                except Exception as err:  # a corrupt member never stops a run
                    self.num_bad += 1
                    warnings.warn(
                        f"skipping unreadable sample {key!r} in {self.paths[shard]} ({type(err).__name__}: {err}); "
                        "the previous sample is repeated in its place",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    if last_good is None:
                        continue
                    img, label = last_good
                if self._mim is None:
                    yield img, label
                else:
                    self._current.item = (img, label)
                    yield self._mim[self.offsets[shard] + member]
        finally:
            for t in tars.values():
                t.close()

    def __repr__(self) -> str:
        return (
            f"ShardDataset(shards={len(self.paths)}, samples={self.total}, rank={self.rank}/{self.world_size}, "
            f"epoch={self.epoch}, start={self.start})"
        )
