"""Parity with the authors' own code: tensors their MAE, CAE and ConvMAE computed (../shared/golden/).

Each test goes the way a user goes — the authors' state dict, saved as a file, through `import_checkpoint`
(what `mimkit import` runs) into a mimkit model — then runs the stored inputs and mask and compares every
stored output to 1e-5 in fp32, on the exact-attention path and on the fused one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mimkit.engine import model_from_checkpoint
from mimkit.interop import import_checkpoint
from mimkit.masking import block_mask_stats, python_block_mask

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden"
pytestmark = pytest.mark.skipif(
    not GOLDEN.is_dir(),
    reason=f"the authors' reference tensors are not here ({GOLDEN}); they ship with the project's CI, "
    "not with a plain clone",
)
ATOL = 1e-5


def _golden(name: str, tmp_path: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """(inputs.* and outputs.* tensors, path of a file holding the authors' state dict under their names)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(GOLDEN / f"{name}_official.safetensors"))
    state = {k.removeprefix("state_dict."): v for k, v in tensors.items() if k.startswith("state_dict.")}
    path = tmp_path / f"{name}_authors.safetensors"
    save_file(state, str(path))
    return {k: v for k, v in tensors.items() if not k.startswith("state_dict.")}, path


def _imported(path: Path, source: str, fused: bool, **overrides) -> torch.nn.Module:
    ckpt = import_checkpoint(path, source=source, **overrides)
    assert ckpt["imported_from"]["initialised"] == []
    model = model_from_checkpoint(ckpt).eval()
    for module in model.modules():
        if hasattr(module, "fused"):
            module.fused = fused
    return model


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, what
    err = (actual.float() - expected).abs().max().item()
    assert err <= ATOL, f"{what}: max |mimkit - authors| = {err:.2e} > {ATOL}"


def _in_grid_order(latent: torch.Tensor, noise: torch.Tensor, prefix: int) -> torch.Tensor:
    """The authors' visible latents (ascending-noise order) re-ordered by patch index, as mimkit keeps them."""
    keep = latent.shape[1] - prefix
    order = noise.argsort(dim=1)[:, :keep].sort(dim=1).indices  # [B, keep]
    patches = torch.gather(latent[:, prefix:], 1, order.unsqueeze(-1).expand(-1, -1, latent.shape[-1]))
    return torch.cat([latent[:, :prefix], patches], dim=1)


@pytest.mark.parametrize("fused", [False, True], ids=["exact", "fused"])
def test_mae_matches_the_authors_code(tmp_path, fused):
    gold, path = _golden("mae", tmp_path)
    model = _imported(path, "mae", fused, norm_pix_loss=True)
    images, mask = gold["inputs.images"], gold["inputs.mask"]
    assert torch.equal(mask, gold["inputs.noise"].argsort(1).argsort(1) >= 16)  # the stored mask is theirs
    with torch.no_grad():
        out = model(images, mask)
        latent = model.forward_encoder(images, mask)
        model.config.__dict__["norm_pix_loss"] = (
            False  # frozen dataclass: the same weights, loss unnormalised
        )
        loss_plain = model(images, mask).loss
    _close(out.loss, gold["outputs.loss"], "loss")
    _close(loss_plain, gold["outputs.loss_no_norm_pix"], "loss without norm-pix")
    _close(out.pred, gold["outputs.pred"], "pred")
    _close(latent, _in_grid_order(gold["outputs.latent"], gold["inputs.noise"], prefix=1), "latent")


@pytest.mark.parametrize("fused", [False, True], ids=["exact", "fused"])
def test_convmae_matches_the_authors_code(tmp_path, fused):
    gold, path = _golden("convmae", tmp_path)
    model = _imported(path, "convmae", fused, norm_pix_loss=True)
    images, mask = gold["inputs.images"], gold["inputs.mask"]
    with torch.no_grad():
        out = model(images, mask)
        latent = model.forward_encoder(images, mask)
    _close(out.loss, gold["outputs.loss"], "loss")
    _close(out.pred, gold["outputs.pred"], "pred")
    _close(latent, _in_grid_order(gold["outputs.latent"], gold["inputs.noise"], prefix=0), "latent")


@pytest.mark.parametrize("fused", [False, True], ids=["exact", "fused"])
def test_cae_matches_the_authors_code(tmp_path, fused):
    gold, path = _golden("cae", tmp_path)
    model = _imported(path, "cae", fused)
    assert model.config.target == "token" and model.config.vocab_size == 1024  # the token head is kept
    images, mask, ids = gold["inputs.images"], gold["inputs.bool_masked_pos"], gold["inputs.token_ids"]
    with torch.no_grad():
        latent = model.forward_encoder(images, mask)
        latent_pred = model.forward_regressor(latent, mask)
        latent_target = model.alignment_target(images, mask)
        logits = model.forward_decoder(latent_pred, mask)
        out = model(images, mask, target_ids=ids)
    _close(latent, gold["outputs.encoder_visible"], "encoder output")
    _close(latent_pred, gold["outputs.latent_pred"], "regressor output")
    _close(latent_target, gold["outputs.latent_target"], "alignment target")
    _close(logits.flatten(0, 1), gold["outputs.logits"], "logits")
    _close(out.metrics["loss_decode"], gold["outputs.loss_main"], "loss_main")
    _close(out.metrics["loss_align"], gold["outputs.loss_align"], "loss_align")
    _close(out.loss, gold["outputs.loss"], "loss")


def test_cae_regressor_would_differ_with_the_class_token_among_keys(tmp_path):
    """The parity test above can fail: mimkit's earlier regressor (class token among keys/values) is off."""
    gold, path = _golden("cae", tmp_path)
    model = _imported(path, "cae", fused=False)
    images, mask = gold["inputs.images"], gold["inputs.bool_masked_pos"]
    with torch.no_grad():
        latent = model.forward_encoder(images, mask)
        pos_vis, pos_m = model._positions(mask, latent.dtype)
        pos_cls = model.rd_pos_embed[:, :1].expand(latent.shape[0], -1, -1)
        x_q = model.mask_token.expand(pos_m.shape[0], pos_m.shape[1], -1)
        for block in model.regressor_blocks:
            x_q = block(x_q, torch.cat([latent, x_q], 1), pos_m, torch.cat([pos_cls, pos_vis, pos_m], 1))
        with_cls = model.regressor_norm(x_q)
    assert (with_cls - gold["outputs.latent_pred"]).abs().max() > 1e-3


def test_cae_import_keeps_the_token_head_and_trains_with_given_ids(tmp_path):
    gold, path = _golden("cae", tmp_path)
    model = _imported(path, "cae", fused=True).train()
    images, mask, ids = gold["inputs.images"], gold["inputs.bool_masked_pos"], gold["inputs.token_ids"]
    with pytest.raises(ValueError, match="tokenizer_path"):
        model(images, mask)  # no tokenizer: it says what to supply
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(4):
        loss = model(images, mask, target_ids=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------------------------------------------------
# Block-wise masks: the authors' generator's statistics (5,000 masks) against mimkit's (2,000 masks)


def test_block_mask_reproduces_the_authors_masks_from_their_seed():
    """Driven by Python's `random` seeded as the authors' script, the generator gives their very masks."""
    import random

    from safetensors.torch import load_file

    expected = load_file(str(GOLDEN / "cae_official.safetensors"))["inputs.bool_masked_pos"]
    rng = random.Random(4)
    got = torch.stack([python_block_mask(rng, (14, 14), 98, min_block=16).flatten() for _ in range(2)])
    assert torch.equal(got, expected)


@pytest.mark.parametrize("grid", ["grid_14x14", "grid_7x7"])
def test_block_mask_statistics_match_the_authors(grid):
    ref = json.loads((GOLDEN / "block_mask_stats.json").read_text())[grid]
    args = ref["generator_args"]
    n = 2000
    rows, cols = args["input_size"]
    mine = block_mask_stats(
        (rows, cols),
        args["num_masking_patches"],
        args["min_num_patches"],
        n,
        torch.Generator().manual_seed(0),
    )
    comp, comp_std = ref["components_per_mask"]["mean"], ref["components_per_mask"]["std"]
    iso = ref["isolated_masked_patches_per_mask"]["mean"]
    # Within three standard errors of the difference of two means (mimkit n=2000, authors 5000).
    se = lambda std: 3 * std * (1 / n + 1 / ref["num_masks"]) ** 0.5  # noqa: E731
    assert abs(mine["components_per_mask"] - comp) <= se(comp_std), (mine, comp)
    iso_std = (iso * (1 - iso)) ** 0.5  # nearly every mask has 0 or 1 isolated patch
    assert abs(mine["isolated_per_mask"] - iso) <= se(iso_std) + 1e-3, (mine, iso)
    bbox = ref["largest_component"]["mean_bounding_box_area_patches"]
    bbox_std = ref["largest_component"]["std_bounding_box_area_patches"]
    assert abs(mine["largest_bbox_area"] - bbox) <= se(bbox_std), (mine, bbox)
    assert mine["exact_count"]
