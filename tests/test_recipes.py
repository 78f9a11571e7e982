"""The paper recipes in configs/ hold the authors' pretraining-script values.

One row per recipe: the authors' global batch and absolute peak lr, final lr, warmup, weight decay, betas,
gradient clipping, drop-path, crop scale, mask. mimkit scales the lr as base_lr * global_batch / 256, so the
row's lr must equal base_lr * batch / 256. A value changed in a recipe without its row fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mimkit.engine.config import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# recipe: (global batch, peak lr, final lr, warmup epochs, wd, betas, clip, drop-path, min crop, mask ratio, kind)
AUTHORS = {
    "mae_vit_base_pretrain.yaml": (4096, 2.4e-3, 0.0, 40, 0.05, (0.9, 0.95), None, 0.0, 0.2, 0.75, "random"),
    "mae_vit_large_pretrain.yaml": (4096, 2.4e-3, 0.0, 40, 0.05, (0.9, 0.95), None, 0.0, 0.2, 0.75, "random"),
    "mae_vit_huge_pretrain.yaml": (4096, 2.4e-3, 0.0, 40, 0.05, (0.9, 0.95), None, 0.0, 0.2, 0.75, "random"),
    "cae_base_pretrain.yaml": (2048, 1.5e-3, 1e-5, 20, 0.05, (0.9, 0.999), 3.0, 0.1, 0.08, 0.5, "block"),
    "cae_large_pretrain.yaml": (2048, 1.5e-3, 1e-5, 40, 0.05, (0.9, 0.999), 3.0, 0.1, 0.08, 0.5, "block"),
    "convmae_base_pretrain.yaml": (3072, 1.8e-3, 0.0, 40, 0.05, (0.9, 0.95), None, 0.0, 0.2, 0.75, "random"),
}


def test_every_paper_recipe_has_a_row():
    paper = {p.name for p in CONFIGS.glob("*_pretrain.yaml")}
    assert paper == set(AUTHORS)


@pytest.mark.parametrize("recipe", sorted(AUTHORS))
def test_paper_recipe_matches_the_authors_script(recipe):
    batch, lr, min_lr, warmup, wd, betas, clip, drop_path, crop, ratio, kind = AUTHORS[recipe]
    cfg = load_config(CONFIGS / recipe)
    assert cfg.optim.base_lr * batch / 256 == pytest.approx(lr)
    assert cfg.optim.min_lr == pytest.approx(min_lr)
    assert cfg.optim.warmup_epochs == warmup
    assert cfg.optim.weight_decay == wd
    assert tuple(cfg.optim.betas) == betas
    assert cfg.optim.clip_grad == clip
    assert cfg.model.get("drop_path_rate", 0.0) == drop_path
    assert cfg.data.min_crop_scale == crop
    assert cfg.model["mask_ratio"] == ratio
    assert cfg.model.get("mask_kind", "random") == kind
    if recipe.startswith("cae"):
        assert cfg.model.get("teacher_mode", "train") == "train"  # the authors' alignment pass
    # the per-process batch times the GPUs named in the recipe's comment gives the authors' batch
    assert f"= {batch}" in (CONFIGS / recipe).read_text()
