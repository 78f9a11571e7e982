"""Evaluation results: metrics from predictions, then result JSON + text summary + confusion-matrix PNG."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C, C] int64 counts; row = true class, column = predicted class."""
    idx = labels.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(
    preds: torch.Tensor, labels: torch.Tensor, num_classes: int, class_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """accuracy, per-class accuracy (recall; None for a class absent from labels) and confusion matrix."""
    cm = confusion_matrix(preds, labels, num_classes)
    support = cm.sum(dim=1)
    names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    per_class = {
        names[c]: (float(cm[c, c]) / float(support[c]) if support[c] > 0 else None)
        for c in range(num_classes)
    }
    return {
        "accuracy": float(cm.diagonal().sum()) / max(1, len(labels)),
        "num_test": len(labels),
        "per_class_accuracy": per_class,
        "confusion_matrix": cm.tolist(),
        "class_names": names,
    }


def plot_confusion(
    cm: Sequence[Sequence[int]], class_names: Sequence[str], path: str | os.PathLike, title: str
) -> None:
    """Row-normalised confusion matrix as a PNG (matplotlib, Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = torch.tensor(cm, dtype=torch.float64)
    rates = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * n, 1.0 + 0.5 * n), dpi=120)
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                v = rates[i, j].item()
                ax.text(
                    j,
                    i,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if v > 0.5 else "black",
                )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _data_line(result: dict[str, Any]) -> str:
    data = result.get("data")
    if not isinstance(data, dict):
        return str(data or "?")
    where = data.get("source", "?") + (f" {data['path']}" if data.get("path") else "")
    return where


def model_title(result: dict[str, Any]) -> str:
    """The model's name, marked when it is a random-init baseline rather than trained weights."""
    key = result.get("model_key") or {}
    name = str(result.get("model", "?"))
    return f"{name} [RANDOM INIT baseline, no pretrained weights]" if key.get("init") == "random" else name


def summary_text(result: dict[str, Any]) -> str:
    from ..data.folder import describe_split

    lines = [f"{result.get('protocol', 'evaluation')} on {_data_line(result)}: {model_title(result)}"]
    if result.get("split"):
        lines.append(f"  data: {describe_split(result['split'])}")
    lines.append(f"  top-1 accuracy: {100 * result['accuracy']:.2f}%  ({result['num_test']} test images)")
    if result.get("best_lr") is not None:
        lines.append(f"  chosen lr: {result['best_lr']:.4g} (base {result.get('best_base_lr')}), selected on "
                     f"{result.get('config', {}).get('selected_on', 'val')}")  # fmt: skip
    for row in result.get("per_lr", []):
        lines.append(
            f"    base_lr {row['base_lr']:<8g} val {100 * row['val_accuracy']:6.2f}%  test {100 * row['test_accuracy']:6.2f}%"
        )
    lines.append("  per-class accuracy:")
    for name, acc in result["per_class_accuracy"].items():
        lines.append(f"    {name:<16} {'n/a' if acc is None else f'{100 * acc:6.2f}%'}")
    for warning in result.get("warnings") or []:
        lines.append(f"  warning: {warning}")
    if result.get("seconds") is not None:
        lines.append(f"  time: {result['seconds']:.1f} s")
    return "\n".join(lines) + "\n"


def write_results(
    result: dict[str, Any], out_dir: str | os.PathLike, stem: str = "result"
) -> dict[str, Path]:
    """Write `<stem>.json`, `<stem>.txt` (summary) and `<stem>_confusion.png` into out_dir; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / f"{stem}.json",
        "summary": out / f"{stem}.txt",
        "confusion": out / f"{stem}_confusion.png",
    }
    paths["json"].write_text(json.dumps(result, indent=2, default=float) + "\n")
    paths["summary"].write_text(summary_text(result))
    random = (result.get("model_key") or {}).get("init") == "random"
    title = f"{result.get('protocol', '')} {100 * result['accuracy']:.1f}%\n{result.get('model', '')}" + (
        "\nRANDOM INIT baseline" if random else ""
    )
    plot_confusion(result["confusion_matrix"], result["class_names"], paths["confusion"], title)
    return paths
