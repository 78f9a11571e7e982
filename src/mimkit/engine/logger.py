"""What a training run reports: one JSON line of metrics per log step (mirrored to TensorBoard) and a
progress bar, both on rank 0 only."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["MetricLogger", "StepMetrics", "TrainingLog", "progress_bar", "run_summary"]


def run_summary(trainer: Any) -> str:
    """The line a run starts with: model, data, batch, schedule, processes, precision, FLOPs and ceiling."""
    t, cfg = trainer, trainer.cfg
    return (
        f"{cfg.model_name}: {t.num_params / 1e6:.2f}M params, {len(t.dataset)} images, global batch "
        f"{t.global_batch}, peak lr {t.peak_lr:.3g}, {t.total_steps} steps ({t.steps_per_epoch:.1f}/epoch), "
        f"{t.dist.world_size} process(es) on {t.dist.device}, {cfg.train.precision}; "
        f"{t.flops_per_image / 1e9:.2f} GFLOP/image/step, matmul ceiling {t.ceiling / 1e9:.0f} GFLOP/s"
    )


class StepMetrics(Mapping[str, float]):
    """One optimizer step's metrics, left on the device: nothing waits for the accelerator until a value is
    read (`stats["loss"]`, `dict(stats)`); the first read brings every value back in one transfer."""

    def __init__(self, tensors: dict[str, torch.Tensor], **numbers: float):
        self.tensors, self.numbers = tensors, numbers
        self._values: dict[str, float] | None = None

    def read(self) -> dict[str, float]:
        if self._values is None:
            keys = sorted(self.tensors)
            values = torch.stack([self.tensors[k].float() for k in keys]).tolist() if keys else []
            self._values = {**dict(zip(keys, values)), **self.numbers}
        return self._values

    def __getitem__(self, key: str) -> float:
        return self.read()[key]

    def __iter__(self) -> Iterator[str]:
        return iter([*sorted(self.tensors), *self.numbers])

    def __len__(self) -> int:
        return len(self.tensors) + len(self.numbers)


class MetricLogger:
    """One JSON line per log step in metrics.jsonl, mirrored to TensorBoard (rank 0 only).

    Rows after `start_step` (logged by an earlier run past the checkpoint it resumes from, or by an earlier
    run in the same folder when starting at 0) are dropped, as is a line cut short by a crash, so each step
    appears once; TensorBoard purges its events after `start_step` the same way.
    """

    def __init__(self, out_dir: Path, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        self.file = self.tb = None
        if enabled:
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / "metrics.jsonl"
            if path.exists():
                _truncate_metrics(path, start_step)
            self.file = open(path, "a")  # noqa: SIM115
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=start_step + 1)
            except ImportError:
                self.tb = None

    def log(self, step: int, stats: Mapping[str, float]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({"step": step, **stats, "time": time.time()}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in stats.items():
                self.tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the rows of metrics.jsonl with step <= last_step (and only complete JSON lines)."""
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= last_step:
            kept.append(line)
    if len(kept) != len(lines):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)


def progress_bar(total: int, initial: int, enabled: bool) -> Any:
    """A tqdm bar over the run's steps, or None when disabled (other ranks, train.progress=false)."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="pretrain", unit="step", dynamic_ncols=True)


class TrainingLog:
    """Rank 0's account of a run, fed once per optimizer step: on log steps a metrics row with throughput
    (`img_per_sec`, images of all processes), per-process `mfu` (this process's share of the images against
    one device's matmul ceiling) and `epoch`; the progress bar after every step. Other ranks only count."""

    def __init__(
        self, out_dir: Path, enabled: bool, start_step: int, total_steps: int, progress: bool,
        images_per_step: int, world_size: int, flops_per_image: float, ceiling: float,
    ):  # fmt: skip
        self.metrics = MetricLogger(out_dir, enabled=enabled, start_step=start_step)
        self.bar = progress_bar(total_steps, start_step, enabled=enabled and progress)
        self.images_per_step, self.world_size = images_per_step, world_size
        self.flops_per_image, self.ceiling = flops_per_image, ceiling
        self.window_start, self.window_images = time.perf_counter(), 0

    def step(self, step: int, stats: Mapping[str, float], write: bool, epoch: float) -> None:
        """Count this step's images; with `write`, read `stats` (waiting for the device) and log them with
        the throughput keys."""
        self.window_images += self.images_per_step
        if write:
            stats = dict(stats)
            stats["img_per_sec"] = self.window_images / (time.perf_counter() - self.window_start)
            stats["mfu"] = stats["img_per_sec"] / self.world_size * self.flops_per_image / self.ceiling
            stats["epoch"] = epoch
            self.metrics.log(step, stats)
            self.window_start, self.window_images = time.perf_counter(), 0
            if self.bar is not None:
                self.bar.set_postfix(
                    loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}",
                    img_s=f"{stats['img_per_sec']:.1f}", mfu=f"{stats['mfu']:.1%}",
                )  # fmt: skip
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.metrics.close()
