"""Loss curves from a run's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def plot_loss_curve(
    metrics_path: str | Path, out_path: str | Path, keys: tuple[str, ...] | None = None
) -> Path:
    """Plot every loss-like series of a metrics.jsonl (loss, loss_decode, loss_align, ...) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{metrics_path} holds no metrics yet")
    keys = keys or tuple(k for k in rows[-1] if k.startswith("loss"))
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot(*zip(*pts), label=k)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
