"""Pictures and the config of a run in TensorBoard, beside the scalars the trainer logs to `<run>/tb`."""

from __future__ import annotations

from pathlib import Path


def log_run_pictures(run_dir: str | Path, step: int) -> list[str]:
    """Add `<run>/reconstructions.png` and `loss_curve.png` as images and `config.yaml` as text to `<run>/tb`
    at `step`; returns the tags written (empty when TensorBoard is not installed or nothing is there)."""
    import numpy as np
    from PIL import Image

    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return []
    run_dir = Path(run_dir)
    written = []
    writer = SummaryWriter(str(run_dir / "tb"))
    try:
        for name in ("reconstructions", "loss_curve"):
            path = run_dir / f"{name}.png"
            if path.is_file():
                with Image.open(path) as img:
                    pixels = np.asarray(img.convert("RGB"))  # [H, W, 3] uint8
                writer.add_image(f"pictures/{name}", pixels, step, dataformats="HWC")
                written.append(f"pictures/{name}")
        config = run_dir / "config.yaml"
        if config.is_file():
            # four-space indent: TensorBoard renders text as markdown, and this keeps the YAML as a code block
            writer.add_text(
                "config", "\n".join("    " + line for line in config.read_text().splitlines()), step
            )
            written.append("config")
    finally:
        writer.close()
    return written
