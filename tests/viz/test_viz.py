"""viz/: the reconstruction panels show the input and its mask where they should, the PNG has one panel per
image and column, loss curves plot what metrics.jsonl holds; `mimkit visualize` writes that picture."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import mimkit
from mimkit.engine.checkpoint import save_model
from mimkit.viz import plot_loss_curve, reconstruction_grid, save_reconstructions

TINY = dict(
    img_size=16,
    embed_dim=32,
    depth=1,
    num_heads=2,
    decoder_embed_dim=32,
    decoder_depth=1,
    decoder_num_heads=2,
)
MEAN, STD = (0.5,), (0.25,)


def patch_pixels(mask: torch.Tensor, grid: int, patch: int) -> np.ndarray:
    """[L] bool patch mask -> [H, W] bool pixel mask (row-major patches)."""
    return mask.reshape(grid, grid).repeat_interleave(patch, 0).repeat_interleave(patch, 1).numpy()


def test_reconstruction_panels_follow_the_input_and_the_mask():
    model = mimkit.create_model("mae_vit_tiny_patch4_32", in_chans=1, **TINY).eval()
    images = torch.rand(3, 1, 16, 16) * 2 - 1  # normalised values: display = clamp(x * 0.25 + 0.5)
    mask = model.mask_generator(3, torch.Generator().manual_seed(0))
    titles, rows = reconstruction_grid(model, images, mask, MEAN, STD)
    assert titles == ["original", "masked", "reconstruction", "reconstruction + visible"]
    assert len(rows) == 3 and all(len(r) == 4 for r in rows)
    for i, (original, masked, recon, pasted) in enumerate(rows):
        shown = (images[i, 0] * STD[0] + MEAN[0]).clamp(0, 1).numpy()
        np.testing.assert_allclose(original[..., 0], shown, atol=1e-6)
        hidden = patch_pixels(mask[i], 4, 4)
        assert hidden.any() and (~hidden).any()
        np.testing.assert_allclose(masked[..., 0][~hidden], shown[~hidden], atol=1e-6)  # visible: the input
        np.testing.assert_allclose(masked[..., 0][hidden], 0.5, atol=1e-6)  # masked: mid-gray
        np.testing.assert_allclose(pasted[..., 0][~hidden], shown[~hidden], atol=1e-6)
        np.testing.assert_allclose(pasted[..., 0][hidden], recon[..., 0][hidden], atol=1e-6)
        assert original.shape == (16, 16, 3)  # gray shown as RGB


def test_the_picture_has_one_panel_per_image_and_column(tmp_path):
    blank = [[np.zeros((8, 8, 3)) for _ in range(4)] for _ in range(2)]
    path = save_reconstructions(["a", "b", "c", "d"], blank, tmp_path / "grid.png", scale=1.0)
    width, height = Image.open(path).size
    assert (width, height) == (4 * 110, 2 * 110)  # scale 1.0 inch per panel at 110 dpi


def test_loss_curve_plots_the_losses_of_metrics_jsonl(tmp_path):
    rows = [{"step": s, "loss": 1.0 / s, "loss_align": 0.5 / s, "lr": 1e-3} for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert Image.open(out).size == (720, 432)  # 6 x 3.6 inches at 120 dpi
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no metrics yet"):
        plot_loss_curve(tmp_path / "empty.jsonl", tmp_path / "none.png")


@pytest.mark.parametrize("name, columns", [("mae_vit_tiny_patch4_32", 4), ("cae_vit_tiny_patch4_32", 6)])
def test_visualize_command_writes_the_grid(tmp_path, capsys, name, columns):
    """CAE (pixel targets) adds its encoder -> decoder reconstruction: two more columns."""
    from mimkit.cli import main

    small = (
        TINY if name.startswith("mae") else {k: v for k, v in TINY.items() if not k.startswith("decoder_e")}
    )
    model = mimkit.create_model(name, in_chans=1, **small)
    save_model(model, tmp_path / "model.pt")
    out = tmp_path / "recon.png"
    args = [
        "visualize",
        "--checkpoint",
        str(tmp_path / "model.pt"),
        "--data",
        "synthetic",
        "--num-images",
        "3",
    ]
    assert main([*args, "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    width, height = Image.open(out).size
    assert (width, height) == (round(1.6 * columns * 110), round(1.6 * 3 * 110))
