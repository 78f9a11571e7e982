"""A distributed sampler that can resume in the middle of an epoch."""

from __future__ import annotations

from collections.abc import Iterator

import torch


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Like DistributedSampler, plus `set_start(k)` to skip the first k samples of this rank's share.

    Epoch order: a permutation of range(num_samples) from a torch.Generator seeded `seed + epoch` (or
    range order when shuffle=False); with drop_last it is truncated to a multiple of num_replicas, otherwise
    padded by repeating its head; rank r takes perm[r::num_replicas]. Consequence: rank r's j-th index is
    perm[j * world + r], so with world=2 the first b indices of both ranks together are exactly the first
    2b indices of the world=1 order: 2 processes x batch b see what 1 process with 2 accumulated
    micro-batches of b sees, step for step.

    `set_start(k)` applies to the current epoch only and is cleared by the next `set_epoch`. `len()` is the
    number of indices the next iteration yields.
    """

    def __init__(
        self,
        num_samples: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas}, {rank}"
            )
        if drop_last and num_samples < num_replicas:
            raise ValueError(
                f"{num_samples} samples cannot be split over {num_replicas} processes with drop_last"
            )
        self.num_samples = num_samples
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0

    @property
    def per_rank(self) -> int:
        """Indices of one rank's share for a whole epoch."""
        if self.drop_last:
            return self.num_samples // self.num_replicas
        return -(-self.num_samples // self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip this rank's first `start` indices of the current epoch (resume after `start` samples)."""
        if not 0 <= start <= self.per_rank:
            raise ValueError(f"start must be in [0, {self.per_rank}] for this rank's share, got {start}")
        self.start = start

    def epoch_indices(self) -> list[int]:
        """This rank's full share for the current epoch (ignores set_start)."""
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=gen).tolist()
        else:
            order = list(range(self.num_samples))
        total = self.per_rank * self.num_replicas
        if total <= len(order):
            order = order[:total]
        else:  # pad by repeating the head (drop_last=False)
            order = (order * (-(-total // len(order))))[:total]
        return order[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.start :])

    def __len__(self) -> int:
        return self.per_rank - self.start
