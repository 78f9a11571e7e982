"""MAE properties: exact, seeded masks; patchify round trip; the loss sees masked patches only."""

from __future__ import annotations

import pytest
import torch

import mimkit
from mimkit.masking import MaskGenerator, block_mask, grid_mask, random_mask
from mimkit.targets import masked_mse, patchify, pixel_target, unpatchify

TINY = dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("num_patches", [64, 196, 49])
def test_random_mask_has_exact_count_per_image(num_patches: int, ratio: float):
    mask = random_mask(8, num_patches, ratio, torch.Generator().manual_seed(0))
    keep = int(num_patches * (1 - ratio))
    assert mask.shape == (8, num_patches) and mask.dtype == torch.bool
    assert (mask.sum(dim=1) == num_patches - keep).all()


@pytest.mark.parametrize("kind", ["random", "block", "grid"])
def test_masks_are_reproducible_from_a_seed(kind: str):
    gen = MaskGenerator(kind, (14, 14), 0.5 if kind == "block" else 0.75)
    a = gen(6, torch.Generator().manual_seed(11))
    b = gen(6, torch.Generator().manual_seed(11))
    assert torch.equal(a, b)
    assert (a.sum(dim=1) == gen.num_masked).all()
    if kind != "grid":
        c = gen(6, torch.Generator().manual_seed(12))
        assert not torch.equal(a, c)
        assert not torch.equal(a[0], a[1])  # images in a batch get different masks


def test_block_mask_masks_exactly_98_of_196_for_many_seeds():
    for seed in range(20):
        mask = block_mask(4, (14, 14), 98, generator=torch.Generator().manual_seed(seed))
        assert (mask.sum(dim=1) == 98).all(), seed


def test_grid_mask_keeps_one_patch_per_2x2_cell():
    mask = grid_mask(2, (4, 6)).reshape(2, 4, 6)
    assert (mask.sum(dim=(1, 2)) == 18).all()
    cells = (~mask[0]).reshape(2, 2, 3, 2).permute(0, 2, 1, 3).reshape(6, 4)  # visible per 2x2 cell
    assert (cells.sum(dim=1) == 1).all()


@pytest.mark.parametrize(
    "shape,patch",
    [((2, 3, 32, 32), 4), ((2, 1, 12, 20), 4), ((1, 4, 28, 14), 7), ((3, 2, 16, 48), 16)],
    ids=["rgb_square", "gray_nonsquare", "4ch_tall", "2ch_wide"],
)
def test_patchify_unpatchify_round_trip(shape, patch: int):
    images = torch.randn(shape)
    B, C, H, W = shape
    patches = patchify(images, patch)
    assert patches.shape == (B, (H // patch) * (W // patch), patch * patch * C)
    assert torch.equal(unpatchify(patches, patch, (H // patch, W // patch), C), images)


def test_patchify_pixel_order_is_row_column_channel():
    images = torch.randn(1, 3, 8, 12)
    patches = patchify(images, 4)  # grid 2 x 3
    # Patch 4 = grid row 1, column 1; element (r, c, ch) sits at (r * 4 + c) * 3 + ch.
    for r, c, ch in [(0, 0, 0), (1, 2, 1), (3, 3, 2), (2, 0, 1)]:
        assert patches[0, 4, (r * 4 + c) * 3 + ch] == images[0, ch, 4 + r, 4 + c]


def test_norm_pix_target_uses_unbiased_variance_plus_eps():
    images = torch.rand(1, 1, 4, 4)
    target = pixel_target(images, 4, norm_pix=True)[0, 0]
    x = images.flatten()
    expected = (x - x.mean()) / torch.sqrt(((x - x.mean()) ** 2).sum() / (x.numel() - 1) + 1e-6)
    torch.testing.assert_close(target, expected)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_ignores_visible_patches(norm_pix: bool):
    model = mimkit.create_model("mae_vit_tiny_patch4_32", norm_pix_loss=norm_pix, **TINY).eval()
    images = torch.rand(2, 3, 32, 32)
    mask = model.mask_generator(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        pred = model(images, mask=mask).pred
        loss = model.forward_loss(images, pred, mask).loss
        grid = model.grid_size

        def edit_patch(index: int) -> torch.Tensor:
            changed = images.clone()
            r, c = divmod(index, grid[1])
            changed[0, :, r * 4 : (r + 1) * 4, c * 4 : (c + 1) * 4] = torch.rand(3, 4, 4)
            return changed

        visible = int((~mask[0]).nonzero()[0])
        masked = int(mask[0].nonzero()[0])
        # Only the target changes (same predictions): visible patches do not count, masked ones do.
        assert torch.equal(model.forward_loss(edit_patch(visible), pred, mask).loss, loss)
        assert not torch.equal(model.forward_loss(edit_patch(masked), pred, mask).loss, loss)


def test_masked_mse_is_mean_over_masked_patches_of_per_patch_mse():
    pred = torch.zeros(1, 3, 2)
    target = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [5.0, 5.0]]])
    mask = torch.tensor([[True, True, False]])
    # per-patch MSE: 1, 2, (25 ignored) -> mean over masked = 1.5
    assert masked_mse(pred, target, mask).item() == pytest.approx(1.5)


def test_mae_forward_contract_shapes_and_drawn_mask_count():
    model = mimkit.create_model("mae_vit_tiny_patch4_32", **TINY)
    out = model(torch.randn(3, 3, 32, 32))
    assert out.pred.shape == (3, 64, 4 * 4 * 3)
    assert out.mask.shape == (3, 64) and out.mask.dtype == torch.bool
    assert (out.mask.sum(dim=1) == 48).all()
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    latent = model.forward_encoder(torch.randn(3, 3, 32, 32), out.mask)
    assert latent.shape == (3, 1 + 16, 32)
