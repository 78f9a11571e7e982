"""Loss curves from a run's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def plot_loss_curve(
    metrics_path: str | Path, out_path: str | Path, keys: tuple[str, ...] | None = None
) -> Path:
    """Plot every loss-like series of a metrics.jsonl (loss, loss_decode, loss_align, ...) against step, and
    the learning rate on a second axis (dashed) when it is logged.

    Readable for short runs too: points are marked when there are few of them (a 3-step run is 1-3 dots, not
    an invisible line), and the loss axis is logarithmic only when the losses span more than a factor of 3.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{metrics_path} holds no metrics yet")
    keys = keys or tuple(k for k in rows[-1] if k.startswith("loss"))
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    marker = "o" if len(rows) <= 50 else None
    values = []
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if k in r]
        if pts:
            ax.plot(*zip(*pts), label=k, marker=marker, markersize=3)
            values += [v for _, v in pts]
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and max(positive) > 3 * min(positive):
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    lr = [(r["step"], r["lr"]) for r in rows if "lr" in r]
    handles, labels = ax.get_legend_handles_labels()
    if lr:
        ax_lr = ax.twinx()
        (line,) = ax_lr.plot(
            *zip(*lr), color="gray", linestyle="--", marker=marker, markersize=2, linewidth=1
        )
        ax_lr.set_ylabel("learning rate", color="gray")
        ax_lr.tick_params(axis="y", colors="gray")
        handles, labels = handles + [line], labels + ["lr"]
    ax.legend(handles, labels, loc="upper right", fontsize=8)
    ax.set_title(f"{len(rows)} logged step(s), last at step {rows[-1]['step']}", fontsize=9)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
