"""Worst differences between mimkit and the authors' own code on the golden tensors, and block-mask statistics
beside the authors' generator's. Prints JSON; tests/test_golden_parity.py holds the same figures to 1e-5.

    python benchmarks/golden_parity.py [--golden ../shared/golden] [--masks 2000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mimkit.engine import model_from_checkpoint
from mimkit.interop import import_checkpoint
from mimkit.masking import block_mask_stats


def imported(golden: Path, name: str, fused: bool, **overrides):
    """(the authors' inputs/outputs, their state dict imported as a user would, attention path set)."""
    tensors = load_file(str(golden / f"{name}_official.safetensors"))
    state = {k.removeprefix("state_dict."): v for k, v in tensors.items() if k.startswith("state_dict.")}
    with tempfile.TemporaryDirectory() as tmp:
        save_file(state, f"{tmp}/sd.safetensors")
        model = model_from_checkpoint(import_checkpoint(f"{tmp}/sd.safetensors", source=name, **overrides))
    for m in model.modules():
        if hasattr(m, "fused"):
            m.fused = fused
    return tensors, model.eval()


def grid_order(latent: torch.Tensor, noise: torch.Tensor, prefix: int) -> torch.Tensor:
    order = noise.argsort(1)[:, : latent.shape[1] - prefix].sort(1).indices
    gathered = torch.gather(latent[:, prefix:], 1, order.unsqueeze(-1).expand(-1, -1, latent.shape[-1]))
    return torch.cat([latent[:, :prefix], gathered], 1)


@torch.no_grad()
def differences(golden: Path, name: str, fused: bool) -> dict[str, float]:
    if name == "cae":
        g, m = imported(golden, name, fused)
        x, mask, ids = g["inputs.images"], g["inputs.bool_masked_pos"], g["inputs.token_ids"]
        latent = m.forward_encoder(x, mask)
        pred = m.forward_regressor(latent, mask)
        out = m(x, mask, target_ids=ids)
        ours = {
            "encoder_visible": latent,
            "latent_pred": pred,
            "latent_target": m.alignment_target(x, mask),
            "logits": m.forward_decoder(pred, mask).flatten(0, 1),
            "loss_main": out.metrics["loss_decode"],
            "loss_align": out.metrics["loss_align"],
            "loss": out.loss,
        }
    else:
        g, m = imported(golden, name, fused, norm_pix_loss=True)
        x, mask = g["inputs.images"], g["inputs.mask"]
        out = m(x, mask)
        g["outputs.latent"] = grid_order(g["outputs.latent"], g["inputs.noise"], 1 if name == "mae" else 0)
        ours = {"loss": out.loss, "pred": out.pred, "latent": m.forward_encoder(x, mask)}
    return {k: (v.float() - g[f"outputs.{k}"]).abs().max().item() for k, v in ours.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--golden", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "golden")
    p.add_argument("--masks", type=int, default=2000)
    args = p.parse_args()
    result: dict = {"max_abs_difference": {}, "block_masks": {}}
    for name in ("mae", "cae", "convmae"):
        for fused in (False, True):
            result["max_abs_difference"][f"{name}/{'fused' if fused else 'exact'}"] = differences(
                args.golden, name, fused
            )
    ref = json.loads((args.golden / "block_mask_stats.json").read_text())
    for grid, r in ref.items():
        if not grid.startswith("grid_"):
            continue
        a = r["generator_args"]
        mine = block_mask_stats(
            tuple(a["input_size"]), a["num_masking_patches"], a["min_num_patches"], args.masks,
            torch.Generator().manual_seed(0),
        )  # fmt: skip
        result["block_masks"][grid] = {
            "mimkit": mine,
            "authors": {
                "components_per_mask": r["components_per_mask"]["mean"],
                "components_std": r["components_per_mask"]["std"],
                "isolated_per_mask": r["isolated_masked_patches_per_mask"]["mean"],
                "largest_bbox_area": r["largest_component"]["mean_bounding_box_area_patches"],
                "num_masks": r["num_masks"],
            },
        }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
