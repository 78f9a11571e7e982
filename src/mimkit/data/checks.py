"""Checks at the start of pretraining that catch a run which would silently go wrong on your own data.

    from mimkit.data.checks import pretrain_warnings
    for line in pretrain_warnings(base_dataset, in_chans, batch_size, world_size, total_steps, warmup_steps):
        print(f"[mimkit] warning: {line}")

Each message says what was found and which key changes it. Only file headers are read (no decoding).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from PIL import Image

_COLOUR_MODES = ("RGB", "RGBA", "RGBX", "P", "CMYK", "YCbCr", "LAB", "HSV")
_SAMPLE = 32  # headers read for the channel check


def image_modes(dataset: Any, limit: int = _SAMPLE) -> Counter:
    """PIL modes of up to `limit` files spread over an ImageFolder (headers only); empty for other sources."""
    samples = getattr(dataset, "samples", None)
    if not samples or not isinstance(samples[0][0], str):
        return Counter()
    step = max(1, len(samples) // limit)
    modes: Counter = Counter()
    for path, _ in samples[::step][:limit]:
        try:
            with Image.open(path) as img:
                modes[img.mode] += 1
        except Exception:  # unreadable: the dataset reports it when it gets there
            continue
    return modes


def channel_warning(modes: Counter, in_chans: int) -> str | None:
    """A warning when the files' colour and the model's channel count disagree."""
    colour = sum(n for mode, n in modes.items() if mode in _COLOUR_MODES)
    if not modes:
        return None
    if in_chans == 1 and colour:
        return (
            f"{colour} of {sum(modes.values())} sampled images are in colour but the model has in_chans=1, so "
            "they are trained as grayscale; set model.in_chans=3 to keep the colour"
        )
    if in_chans == 3 and not colour:
        return (
            "the sampled images are all grayscale; they are trained as 3 identical channels (model.in_chans=3). "
            "model.in_chans=1 does the same work with a third of the input"
        )
    return None


def no_batch_message(num_images: int, batch_size: int, world_size: int = 1) -> str | None:
    """The error for a dataset that gives no full batch (the last partial batch is dropped), or None."""
    if num_images >= batch_size * world_size:
        return None
    per = f" on each of {world_size} processes" if world_size > 1 else ""
    return (
        f"found {num_images} images, fewer than data.batch_size={batch_size}{per}: no full batch can be formed. "
        f"Set data.batch_size={max(1, num_images // world_size)} or lower, or add images"
    )


def pretrain_warnings(
    dataset: Any,
    in_chans: int,
    batch_size: int,
    world_size: int,
    total_steps: int,
    warmup_steps: int,
    min_images: int = 1000,
) -> list[str]:
    """Plain-language warnings: colour / channel mismatch, warmup as long as the run, very little data."""
    out = []
    warning = channel_warning(image_modes(dataset), in_chans)
    if warning:
        out.append(warning)
    if warmup_steps >= total_steps:
        out.append(
            f"the warmup ({warmup_steps} steps) is as long as the run ({total_steps} steps): the learning rate "
            "never reaches its peak. Set optim.warmup_steps (e.g. a tenth of the run) or lower optim.warmup_epochs"
        )
    n = len(dataset)
    if n < min_images:
        epochs = total_steps * batch_size * world_size / max(1, n)
        out.append(
            f"only {n} images: {total_steps} steps go over each about {epochs:.0f} times. That is fine for a first "
            "try; features that generalise need thousands of images"
        )
    return out
