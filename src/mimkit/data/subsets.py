"""Seeded, stratified label subsets: "1% of the labels" as an exact number of images per class.

    from mimkit.data.subsets import stratified_indices, labelled_subset
    idx = stratified_indices(dataset_labels(train), fraction=0.01, seed=0)  # 60 per class on Fashion-MNIST
    small = labelled_subset(train, fraction=0.01, seed=0)                    # a torch Subset of those images

Each class keeps `per_class` images, or round(fraction x the class's count) with at least one; the images
are drawn without replacement by a generator seeded with `seed` (its own stream per class), so the same
seed gives the same subset and a different seed a different one. Indices come back sorted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def dataset_labels(dataset) -> np.ndarray:
    """[N] int64 labels of a labelled dataset: its `labels` / `targets` array when it has one (Fashion-MNIST,
    torchvision datasets), else the last element of every item (slow: loads each item)."""
    for attr in ("labels", "targets"):
        values = getattr(dataset, attr, None)
        if values is not None and len(values) == len(dataset):
            return np.asarray(values, dtype=np.int64)
    base = getattr(dataset, "base", None)  # eval.pipeline.Transformed keeps the labelled dataset as .base
    if base is not None and len(base) == len(dataset):
        return dataset_labels(base)
    if isinstance(dataset, torch.utils.data.Subset):
        return dataset_labels(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    return np.asarray([int(dataset[i][-1]) for i in range(len(dataset))], dtype=np.int64)


def per_class_counts(
    labels: Sequence[int] | np.ndarray, fraction: float | None = None, per_class: int | None = None
) -> dict[int, int]:
    """{class: images kept}: `per_class` each (capped at the class's size), or round(fraction x size), >= 1."""
    if (fraction is None) == (per_class is None):
        raise ValueError("give exactly one of fraction (0 < f <= 1) or per_class (>= 1)")
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if per_class is not None and per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    classes, sizes = np.unique(np.asarray(labels, dtype=np.int64), return_counts=True)
    if per_class is not None:
        return {int(c): min(per_class, int(n)) for c, n in zip(classes, sizes)}
    assert fraction is not None  # exactly one of the two was given
    return {int(c): max(1, min(int(n), round(fraction * int(n)))) for c, n in zip(classes, sizes)}


def stratified_indices(
    labels: Sequence[int] | np.ndarray,
    fraction: float | None = None,
    per_class: int | None = None,
    seed: int = 0,
) -> list[int]:
    """Sorted indices of a seeded stratified subset: exactly `per_class_counts(...)[c]` images of class c."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = per_class_counts(labels, fraction, per_class)
    chosen = []
    for c, k in counts.items():
        members = np.flatnonzero(labels == c)
        rng = np.random.default_rng([seed, c])  # one stream per class: the classes do not shift each other
        chosen.append(members[rng.permutation(len(members))[:k]])
    return sorted(int(i) for i in np.concatenate(chosen)) if chosen else []


def labelled_subset(
    dataset, fraction: float | None = None, per_class: int | None = None, seed: int = 0
) -> torch.utils.data.Subset:
    """A `torch.utils.data.Subset` of `dataset` holding a seeded stratified subset (see stratified_indices);
    fraction 1.0 keeps every image."""
    labels = dataset_labels(dataset)
    return torch.utils.data.Subset(dataset, stratified_indices(labels, fraction, per_class, seed))
