"""Process-group setup for torchrun: one entry point for 1 process, N processes, or N nodes."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Read torchrun's environment; start gloo (CPU) or nccl (CUDA) when there are several processes."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device(device, local_rank) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank, dev)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on `device` for precision "bf16"; nothing for "fp32"."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size
    return t


def all_reduce_max(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


@functools.cache
def _host_group(world: object) -> Any:
    """A gloo group over every process of `world` (the default group when it is gloo), for CPU values."""
    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def host_max(value: float, info: DistInfo) -> float:
    """The largest of a Python number over all processes, exchanged on the CPU: it never waits for the
    device (a CUDA all-reduce read back with .item() would wait for every queued kernel)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_host_group(dist.group.WORLD))
    return float(t.item())


def all_finite(tensors: Iterable[torch.Tensor], info: DistInfo) -> bool:
    """Whether every tensor on every process is finite (one host sync). Sharded tensors (FSDP's DTensor)
    are checked locally, an empty shard counts as finite."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    flags = [~torch.isfinite(t).all() for t in local if t.numel()]
    bad = torch.stack(flags).any().float() if flags else torch.zeros((), device=info.device)
    return all_reduce_max(bad, info).item() == 0


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
