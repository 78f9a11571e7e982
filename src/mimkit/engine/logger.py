"""What a training run reports: one JSON line of metrics per log step (mirrored to TensorBoard) and a
progress bar, both on rank 0 only."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["MetricLogger", "progress_bar"]


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

    def log(self, step: int, stats: dict[str, float]) -> None:
        if not self.enabled:
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
