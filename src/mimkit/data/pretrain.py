"""The pretraining data path in one call: base dataset -> transform + per-sample mask -> loader.

    loader, dataset, position = build_pretrain_data(cfg.data, model, seed=0, rank=rank, world_size=world)
    for images, masks, labels in micro_batches(loader, dataset, position, start=0, data=cfg.data): ...

`data` is the `data` section of the run config (any object with its fields: source, path, split,
num_samples, batch_size, num_workers, mean, std, min_crop_scale, max_image_pixels).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError, DataError

if TYPE_CHECKING:
    from ..protocols import MIMMethod
from .checks import no_batch_message

__all__ = ["build_pretrain_data", "check_readable", "micro_batches", "skipped_images_note"]


def build_pretrain_data(
    data: Any, model: MIMMethod, seed: int, rank: int = 0, world_size: int = 1
) -> tuple[torch.utils.data.DataLoader, Any, Any]:
    """(loader, dataset, position keeper): the dataset has set_epoch, the keeper set_epoch / set_start.

    Images are resized to `model.config.img_size` with its `in_chans`, masks drawn by `model.mask_generator`.
    A folder or known dataset too small for one full batch per process raises DataError; a stream of
    shards splits by rank and worker and keeps its own position (the dataset is its own keeper).
    """
    from . import MIMDataset, ResumableSampler, build_dataset, build_loader, default_mean_std
    from .transforms import pretrain_transform

    c, mc = data, model.config
    if c.source in ("folder", "shards") and c.path is None:  # a recipe may leave it to the command line
        what = (
            "a folder of images"
            if c.source == "folder"
            else "a shard pattern (shards/train-{0000..0099}.tar)"
        )
        raise ConfigError(f"config key data.path=null: expected {what} when data.source={c.source}")
    mean, std = default_mean_std(c.source, mc.in_chans)
    transform = pretrain_transform(
        mc.img_size, mc.in_chans, c.mean or mean, c.std or std, scale=(c.min_crop_scale, 1.0)
    )
    dataset: Any
    if c.source == "shards":
        from .shards import ShardDataset

        dataset = ShardDataset(
            c.path, c.batch_size, rank, world_size, seed=seed, in_chans=mc.in_chans, transform=transform,
            mask_generator=model.mask_generator, max_image_pixels=c.max_image_pixels,
        )  # fmt: skip
        return build_loader(dataset, c.batch_size, c.num_workers), dataset, dataset
    base = build_dataset(
        c.source, path=c.path, split=c.split, num_samples=c.num_samples,
        img_size=mc.img_size, in_chans=mc.in_chans, seed=seed, max_image_pixels=c.max_image_pixels,
    )  # fmt: skip
    if c.source == "folder":
        check_readable(base, c.path)
    too_few = no_batch_message(len(base), c.batch_size, world_size)
    if too_few:
        raise DataError(too_few)
    dataset = MIMDataset(base, transform, model.mask_generator, seed=seed)
    sampler = ResumableSampler(len(dataset), world_size, rank, seed=seed, shuffle=True)
    return build_loader(dataset, c.batch_size, c.num_workers, sampler), dataset, sampler


def micro_batches(
    loader: torch.utils.data.DataLoader, dataset: Any, position: Any, start: int, data: Any
) -> Iterator[Any]:
    """The loader's batches forever from micro-batch `start` (counted from the run's first): each epoch
    sets the position keeper's and the dataset's epoch (new order, new augmentations and masks); `start`
    inside an epoch resumes there. DataError when an epoch gives no batch (`data`: the config's section)."""
    epoch, skip = divmod(start, len(loader))
    while True:
        position.set_epoch(epoch)
        dataset.set_epoch(epoch)
        if skip:
            position.set_start(skip * data.batch_size)
            skip = 0
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:  # e.g. a stream of shards where no sample decodes: never loop over nothing
            raise DataError(
                f"epoch {epoch} gave no batch of {data.batch_size}: no sample of data.path={data.path} could "
                "be read (see the warnings above); check the data"
            )
        epoch += 1


def check_readable(base: Any, path: Any) -> None:
    """Fail early, in one line, when not one file of an image folder decodes (rather than in a worker)."""
    try:
        base[0]
    except RuntimeError:
        if not getattr(base, "num_bad", 0):
            raise
        raise DataError(
            f"no usable image under data.path={path}: all {base.num_bad} file(s) failed to decode or were over "
            "data.max_image_pixels (see the warnings above); point data.path at a folder of images"
        ) from None


def skipped_images_note(dataset: Any, data: Any) -> str | None:
    """What a run says at its end about the images this process could not read, if any."""
    bad = getattr(dataset, "num_bad", 0)
    if not bad:
        return None
    return (
        f"skipped {bad} unreadable image(s) in this process (including any over "
        f"data.max_image_pixels={data.max_image_pixels}); see the warnings above"
    )
